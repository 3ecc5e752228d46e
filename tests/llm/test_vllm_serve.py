"""``vllm serve`` with the modelseal load format, keys from the host agent of a real key service: the
OpenAI API answers with the plain model's tokens; a sealed LoRA adapter loads at run time and changes
the output exactly as the plain adapter does; revoking the grant refuses new adapters and then stops the
server, which exits non-zero naming the reason."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx

import modelseal
from modelseal.errors import KeyReleaseError
from modelseal.load.artifacts import key_ids
from modelseal.load.leasewatch import EXIT_KEY_LOST
from modelseal.pki import identity_of_cert_file
from modelseal.release.recipient import KeyserverRecipient
from modelseal.release.wire import ask

from ..services import Agent, KeyServer, wait_for
from ..test_keyserver import grant
from .conftest import Llm
from .engines import VLLM, VllmServer, vllm_env

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w200 w5 w7 w9 w11"]


def completion_ids(server: VllmServer, model: str) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["token_ids"])
    return out


def load_adapter(server: VllmServer, name: str, path: Path) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path)}
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=120)


def test_serve_sealed_llm_from_the_agent_with_lora_then_revoke(
    llm: Llm, plain_ids: list, tmp_path: Path  # type: ignore[type-arg]
) -> None:
    with KeyServer(tmp_path / "ks", None, leases={"lease_ttl_s": 4, "renew_after_s": 1}) as ks:
        with ks.admin() as admin:
            admin.call("POST", "/v1/admin/models", {"model": "tiny-llama"})
        to_service = [KeyserverRecipient(ks.url, "tiny-llama", token=ks.token, ca=ks.ca)]
        sealed, adapter = tmp_path / "sealed-llm", tmp_path / "sealed-adapter"
        modelseal.seal(llm.plain, sealed, to_service, model_id="tiny-llama")  # type: ignore[arg-type]
        modelseal.seal(llm.lora, adapter, to_service, model_id="tiny-llama-lora")  # type: ignore[arg-type]
        cert = ks.host_cert("gpu-host")
        g = grant(ks, "tiny-llama", identity_of_cert_file(cert[0]).spki)
        agent = Agent(ks, cert, tmp_path, socket=tmp_path / "a.sock").start()
        extra = {"identity": f"agent:{agent.socket}", "key_check_s": 1, "grace_s": 8}
        server = VllmServer(
            sealed, tmp_path / "vllm.log",
            ["--load-format", "modelseal", "--model-loader-extra-config", json.dumps(extra),
             "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"],
            env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        )  # fmt: skip
        try:
            server.wait_ready()
            models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
            assert [m["id"] for m in models] == [str(sealed)]  # addressed by the path the client knows
            assert completion_ids(server, str(sealed)) == plain_ids

            assert load_adapter(server, "plain-lora", llm.lora).status_code == 200
            assert load_adapter(server, "sealed-lora", adapter).status_code == 200, server.text()[-2000:]
            with_lora = completion_ids(server, "sealed-lora")
            assert with_lora == completion_ids(server, "plain-lora")
            assert with_lora != plain_ids  # the adapter does change the output

            with ks.admin() as admin:
                admin.call("POST", f"/v1/admin/grants/{g['grant_id']}/revoke", {"reason": "licence ended"})
            key_id = next(iter(key_ids(sealed)))

            def refused() -> bool:
                try:
                    ask(agent.socket, {"op": "key", "key_id": key_id, "model": "tiny-llama"})[1][:] = b"\0" * 32
                except KeyReleaseError:
                    return True
                return False

            wait_for(refused, 30, "the agent to drop the revoked key")
            again = tmp_path / "sealed-adapter-2"
            shutil.copytree(adapter, again)
            late = load_adapter(server, "late-lora", again)
            assert late.status_code != 200 and "revoked" in late.text, late.text
            assert server.proc.wait(90) != 0
            log = server.text()
            stopped = r"modelseal: stopping (vLLM|the engine): key \S+ of model 'tiny-llama': revoked"
            assert re.search(stopped, log), log[-3000:]
            assert server.proc.returncode == EXIT_KEY_LOST
            # the staged configuration went with it (os._exit skips the finalizer that removes it)
            assert not list(Path("/dev/shm").glob(f"modelseal-{server.proc.pid}-*"))
            # and it cannot start again: the refusal is one line, before any engine process
            again = subprocess.run(
                [*VLLM, "serve", str(sealed), "--load-format", "modelseal", "--model-loader-extra-config",
                 json.dumps(extra), "--port", "1"], capture_output=True, text=True, timeout=300, env=vllm_env(),
            )  # fmt: skip
            assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-2000:]
            refusal = rf"^modelseal: {re.escape(str(sealed))}/\S+: .*revoked"
            assert re.search(refusal, again.stderr, re.M), again.stderr[-800:]
        finally:
            server.stop()
            agent.stop()
