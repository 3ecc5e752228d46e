"""Sealed models inside a real tritonserver (nvidia-pytriton's), through modelseal's Python-backend model.

One server per test: sealed ONNX, TorchScript and state-dict models laid out by ``triton-repo``'s library
call answer tritonclient exactly as the framework run directly; an audit hook installed in the backend stub
process (its model.py) records every file opened for writing and finds none, and the weights' bytes are in
no stub shared-memory region; a wrong key, a missing file and a tampered file are one-line load errors. With
the key from a real agent, revoking the grant makes the model refuse within one key-check interval.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import modelseal
from modelseal.errors import MissingDependencyError
from modelseal.pki import identity_of_cert_file
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.release.recipient import KeyserverRecipient
from modelseal.release.wire import ask
from modelseal.triton.layout import Layout, lay_out, tensor_option
from modelseal.triton.server import TritonServer

from ..services import Agent, KeyServer, wait_for
from ..test_keyserver import grant
from ..write_audit import WRITE_AUDIT_HOOK

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("tritonclient.http")
SHAPE = (3, 4)
# the stub's model.py: the frameworks imported first (first imports may write caches), then the hook, then
# modelseal's model; what was written is printed when the model is unloaded
PROBE = ("import json\nimport numpy, onnxruntime, torch\n" + WRITE_AUDIT_HOOK
         + "from modelseal.triton.model import TritonPythonModel as _Model\n"
         "class TritonPythonModel(_Model):\n"
         "    def finalize(self):\n"
         "        super().finalize()\n"
         "        print('WRITES ' + json.dumps(writes), flush=True)\n")  # fmt: skip


def server_or_skip(repo: Path, log: Path, models: list[str]) -> TritonServer:
    try:
        return TritonServer(repo, log, models, venv=os.environ.get("MODELSEAL_TRITON_ENV")).start()
    except MissingDependencyError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()


def exports(tmp: Path) -> dict[str, Path]:
    """The plain model files (in tmp/plain, never in the repository)."""
    from bench.models import export_onnx, export_torchscript

    plain = tmp / "plain"
    plain.mkdir()
    (plain / "model.onnx").write_bytes(export_onnx(net(), SHAPE))
    (plain / "model.pt").write_bytes(export_torchscript(net(), SHAPE))
    from safetensors.torch import save_file

    save_file(net().state_dict(), str(plain / "model.safetensors"))
    (plain / "net.py").write_text("import torch\n\n\ndef model():\n"
                                  "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))\n")
    return {"onnx": plain / "model.onnx", "pt": plain / "model.pt", "safetensors": plain / "model.safetensors"}


def seal(plain: Path, out: Path, recipients: list[object]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sealed = out / f"{plain.name}.sealed"
    modelseal.seal(plain, sealed, recipients, as_bundle=plain.suffix != ".safetensors")  # type: ignore[arg-type]
    return sealed


def layout(sealed: Path, repo: Path, name: str, identity: object, serve_identity: str, **extra: object) -> None:
    declared = {"inputs": (tensor_option("input:FP32:3,4"),), "outputs": (tensor_option("output:FP32:3"),)}
    lay_out(Layout(sealed, repo, name, identity=identity, serve_identity=serve_identity,  # type: ignore[arg-type]
                   max_batch_size=8, **{**declared, **extra}))  # type: ignore[arg-type]  # fmt: skip
    (repo / name / "1" / "model.py").write_text(PROBE)


def infer(client: object, model: str, batch: np.ndarray) -> np.ndarray:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    return client.infer(model, [inp]).as_numpy("output")  # type: ignore[attr-defined,no-any-return]


def test_sealed_models_in_triton(tmp_path: Path, host: HpkeIdentity, host_key: Path, other_host: HpkeIdentity) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    plain = exports(tmp_path)
    repo, sealed = tmp_path / "repo", tmp_path / "sealed"
    key = str(host_key)
    for kind in ("onnx", "pt"):
        layout(seal(plain[kind], sealed / kind, [host.recipient]), repo, f"m_{kind}", key, key)
    st = seal(plain["safetensors"], sealed / "st", [host.recipient])
    (st.parent / "net.py").write_text((tmp_path / "plain" / "net.py").read_text())
    layout(st, repo, "m_state_dict", key, key, entry_point="net:model")
    (repo / "m_state_dict" / "net.py").write_text((tmp_path / "plain" / "net.py").read_text())
    # bad cases: sealed to another host; the file gone; one ciphertext byte flipped
    layout(seal(plain["onnx"], sealed / "other", [host.recipient]), repo, "wrong_key", key, key)
    modelseal.seal(plain["onnx"], repo / "wrong_key" / "1" / "model.onnx.sealed", [other_host.recipient],
                   as_bundle=True, force=True)  # fmt: skip
    layout(seal(plain["onnx"], sealed / "gone", [host.recipient]), repo, "missing", key, key)
    (repo / "missing" / "1" / "model.onnx.sealed").unlink()
    layout(seal(plain["onnx"], sealed / "tamper", [host.recipient]), repo, "tampered", key, key)
    target = repo / "tampered" / "1" / "model.onnx.sealed"
    data = bytearray(target.read_bytes())
    data[-100] ^= 1
    target.write_bytes(bytes(data))
    assert not [p for p in repo.rglob("*") if p.suffix in (".onnx", ".pt", ".safetensors")]  # sealed only on disk

    batch = np.random.default_rng(0).standard_normal((5, *SHAPE), dtype=np.float32)
    expected_onnx = ort.InferenceSession(str(plain["onnx"])).run(["output"], {"input": batch})[0]
    with torch.inference_mode():
        expected_torch = torch.jit.load(io.BytesIO(plain["pt"].read_bytes()))(torch.from_numpy(batch)).numpy()
        expected_sd = net()(torch.from_numpy(batch)).numpy()
    served = ["m_onnx", "m_pt", "m_state_dict"]
    log = tmp_path / "triton.log"
    server = server_or_skip(repo, log, served)
    try:
        client = httpclient.InferenceServerClient(server.http)
        np.testing.assert_array_equal(infer(client, "m_onnx", batch), expected_onnx)
        np.testing.assert_array_equal(infer(client, "m_pt", batch), expected_torch)
        np.testing.assert_array_equal(infer(client, "m_state_dict", batch), expected_sd)
        # the stub's shared-memory regions hold request and response tensors, never the weights
        weights = net()[1].weight.detach().numpy().tobytes()
        for region in Path("/dev/shm").glob("triton_python_backend_shm_region_*"):
            assert weights not in region.read_bytes(), region
        for name, why in (("wrong_key", "none of your identities .* can unwrap its data key"), ("missing", "none of"),
                          ("tampered", "authentic|tamper|corrupt|damaged")):  # fmt: skip
            with pytest.raises(InferenceServerException) as refused:
                client.load_model(name)
            message = str(refused.value)
            assert "modelseal: " in message and re.search(why, message, re.I), message
            assert "Traceback" not in message
            assert not client.is_model_ready(name)
        for name in served:
            client.unload_model(name)
        wait_for(lambda: log.read_text().count("WRITES ") == len(served), 60, "the models to unload")
    finally:
        server.stop()
    lines = [line.split("WRITES ", 1)[1] for line in log.read_text().splitlines() if "WRITES " in line]
    reports = [[p for p in json.loads(line) if p != "/dev/null"] for line in lines]  # /dev/null is no file
    assert reports == [[]] * len(served), reports


def test_revoked_key_refused_within_one_check(renewing_keyserver: KeyServer, tmp_path: Path) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    keyserver = renewing_keyserver
    with keyserver.admin() as admin:
        admin.call("POST", "/v1/admin/models", {"model": "tiny"})
    recipient = KeyserverRecipient(keyserver.url, "tiny", token=keyserver.token, ca=keyserver.ca)
    plain = exports(tmp_path)
    host_cert = keyserver.host_cert("triton-host")
    g = grant(keyserver, "tiny", identity_of_cert_file(host_cert[0]).spki)
    agent = Agent(keyserver, host_cert, tmp_path).start()
    check_s = 1.0
    repo = tmp_path / "repo"
    spec = f"agent:{agent.socket}"
    layout(seal(plain["onnx"], tmp_path / "sealed", [recipient]), repo, "tiny", spec, spec, key_check_s=check_s)
    server = server_or_skip(repo, tmp_path / "triton.log", ["tiny"])
    try:
        client = httpclient.InferenceServerClient(server.http)
        batch = np.ones((2, *SHAPE), np.float32)
        assert infer(client, "tiny", batch).shape == (2, 3)
        with keyserver.admin() as admin:
            admin.call("POST", f"/v1/admin/grants/{g['grant_id']}/revoke", {"reason": "licence ended"})
        wait_for(lambda: ask(agent.socket, {"op": "status"})[0]["keys"] == [], 15, "the agent to drop the key")
        dropped = time.monotonic()

        def refused() -> bool:
            try:
                infer(client, "tiny", batch)
            except InferenceServerException as exc:
                assert "revoked" in str(exc) and "not ready" in str(exc), str(exc)
                return True
            return False

        wait_for(refused, 10, "the model to refuse")
        assert time.monotonic() - dropped <= check_s + 1.0  # one check interval (plus a request's time)
    finally:
        server.stop()
        agent.stop()
    assert sys.modules  # the server and agent stopped
