"""Usage metering of a sealed LLM in vLLM, end to end: a key service grant with a request quota, an agent
keeping a signed usage log, and a real vLLM engine loading the sealed model through the agent. The log
(every entry verified with :class:`ChainVerifier`) must hold exactly the requests served and the prompt
and output tokens vLLM itself reports; ``QuotaMiddleware`` refuses the request past the quota with 429
and the limit named; a client that leaves mid-stream is still charged for its prompt and tokens; the
``LLM(...)`` API is metered the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

import modelseal
from modelseal.errors import UsageError
from modelseal.load.artifacts import key_ids
from modelseal.pki import identity_of_cert_file
from modelseal.recipients.hpke import generate_identity
from modelseal.release.identity import AgentIdentity
from modelseal.release.recipient import KeyserverRecipient
from modelseal.release.terms import Usage
from modelseal.release.usage import ChainVerifier
from modelseal.release.wire import ask
from modelseal.vllm import metering
from modelseal.vllm.options import parse_options

from ..services import Agent, KeyServer, wait_for
from ..test_keyserver import grant, sealed_model
from .conftest import Llm
from .engines import VllmServer, run_llm

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w200 w5 w7 w9 w11"]


class Licensed:
    """A key service, the model sealed to it, a grant with ``terms`` and an agent with a usage log."""

    def __init__(self, ks: KeyServer, llm: Llm, tmp: Path, terms: dict[str, Any]) -> None:
        with ks.admin() as admin:
            admin.call("POST", "/v1/admin/models", {"model": "tiny-llama"})
        self.sealed = tmp / "sealed-llm"
        to_service = [KeyserverRecipient(ks.url, "tiny-llama", token=ks.token, ca=ks.ca)]
        modelseal.seal(llm.plain, self.sealed, to_service, model_id="tiny-llama")  # type: ignore[arg-type]
        cert = ks.host_cert("gpu-host")
        self.grant = grant(ks, "tiny-llama", identity_of_cert_file(cert[0]).spki, terms=terms)
        self.usage_log = tmp / "usage.log"
        self.agent = Agent(ks, cert, tmp, socket=tmp / "a.sock", usage_log=str(self.usage_log)).start()

    def logged(self) -> Usage:
        """The grant's usage in the agent's log, every entry verified (a line still being written is left out)."""
        verifier, total = ChainVerifier(), Usage()
        data = self.usage_log.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            entry = verifier.add(line)
            if entry.kind == "usage":
                assert entry.grant == self.grant["grant_id"] and entry.body["model"] == "tiny-llama"
                total = total + entry.delta
        return total


def complete(server: VllmServer, model: str, prompt: str) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def served(response: httpx.Response) -> Usage:
    """What vLLM says it served for one completion: its own prompt and output token ids."""
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    prompt, output = len(choice["prompt_token_ids"]), len(choice["token_ids"])
    assert (prompt, output) == (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"])
    return Usage(requests=1, items=1, input_tokens=prompt, output_tokens=output)


def test_serve_meters_tokens_and_refuses_past_the_quota(llm: Llm, tmp_path: Path) -> None:
    with KeyServer(tmp_path / "ks", None) as ks:
        lic = Licensed(ks, llm, tmp_path, {"max_requests": 5})
        extra = {"identity": f"agent:{lic.agent.socket}", "key_check_s": 0}
        server = VllmServer(
            lic.sealed, tmp_path / "vllm.log",
            ["--load-format", "modelseal", "--model-loader-extra-config", json.dumps(extra),
             "--middleware", "modelseal.vllm.metering.QuotaMiddleware"],
        )  # fmt: skip
        model = str(lic.sealed)
        try:
            server.wait_ready()
            expected = Usage()
            for prompt in PROMPTS:
                expected = expected + served(complete(server, model, prompt))

            # a client that leaves after the first streamed chunk is charged for what the engine did
            stream_prompt = "w3 w1 w4 w1 w5 w9 w2 w6"
            tokens = httpx.post(f"{server.url}/tokenize", json={"model": model, "prompt": stream_prompt}, timeout=30)
            body = {"model": model, "prompt": stream_prompt, "max_tokens": 100, "temperature": 0, "stream": True,
                    "ignore_eos": True}  # fmt: skip
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as stream:
                assert stream.status_code == 200
                next(line for line in stream.iter_lines() if line.startswith("data: {"))
            expected = expected + Usage(requests=1, items=1, input_tokens=tokens.json()["count"])

            expected = expected + served(complete(server, model, PROMPTS[0]))  # the 5th request: within the quota
            refused = complete(server, model, PROMPTS[1])
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "quota_exceeded" and "max_requests 5 per day reached" in error["message"]
            assert int(refused.headers["retry-after"]) >= 1
            wait_for(lambda: lic.logged().requests == 5, 20, "the agent to log five requests")
        finally:
            assert server.stop() is not None
            lic.agent.stop()
        logged, text = lic.logged(), server.log.read_text()  # after the engine's last report at exit
        assert (logged.requests, logged.items, logged.input_tokens) == (5, 5, expected.input_tokens), text[-3000:]
        # the stream's tokens up to the client leaving (at least its first), at most its max_tokens
        assert expected.output_tokens + 1 <= logged.output_tokens <= expected.output_tokens + 100, logged
        assert "modelseal: metering requests and tokens for key k_" in text


def test_llm_api_is_metered(llm: Llm, tmp_path: Path) -> None:
    with KeyServer(tmp_path / "ks", None) as ks:
        lic = Licensed(ks, llm, tmp_path, {"metered": True})
        try:
            ids, proc = run_llm(
                lic.sealed, load_format="modelseal", extra={"identity": f"agent:{lic.agent.socket}", "key_check_s": 0}
            )
            assert ids is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
        finally:
            lic.agent.stop()
        tokenizer = AutoTokenizer.from_pretrained(str(llm.plain))
        prompts = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)  # run_llm.py's default prompts
        assert lic.logged() == Usage(requests=3, items=3, input_tokens=prompts, output_tokens=sum(map(len, ids)))


def test_meter_option_needs_the_agent(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'meter' must be true or false"):
        parse_options({"meter": "yes"})
    key_file = generate_identity()
    with pytest.raises(UsageError, match="'meter' needs keys from the host agent"):
        metering.plan("m", parse_options({"meter": True}), key_file, {"k_1"})
    assert not metering.plan("m", parse_options({}), key_file, {"k_1"})  # default: only with an agent
    agent = AgentIdentity(str(tmp_path / "a.sock"))
    assert not metering.plan("m", parse_options({"meter": False}), agent, {"k_1"})
    assert not metering.plan("m", parse_options({}), agent, set())  # no key-service key: nothing to report under


@contextlib.contextmanager
def metered_model(tmp_path: Path, terms: dict[str, Any]) -> Iterator[tuple[metering.Metering, Path, dict[str, Any]]]:
    """A key service granting a sealed model with ``terms``, an agent holding its key with a usage log, and
    the model's :class:`metering.Metering`: (metering, usage log, grant)."""
    with KeyServer(tmp_path / "ks", None) as ks:
        sealed = sealed_model(ks, tmp_path)
        (key_id,) = key_ids(sealed)
        cert = ks.host_cert("gpu-host")
        g = grant(ks, "demo", identity_of_cert_file(cert[0]).spki, terms=terms)
        usage_log = tmp_path / "usage.log"
        agent = Agent(ks, cert, tmp_path, socket=tmp_path / "a.sock", usage_log=str(usage_log)).start()
        try:
            ask(agent.socket, {"op": "key", "key_id": key_id, "model": "demo"})[1][:] = b"\0" * 32
            meter = metering.Metering(agent.socket, frozenset({key_id, "k_not_held"}))
            assert meter.key_id == key_id  # the key the agent holds, known from the first report
            yield meter, usage_log, g
        finally:
            agent.stop()


def body(data: bytes, chunk: int = 7) -> Any:
    """An ASGI ``receive`` handing out ``data`` in chunks, as a server does."""
    parts = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]

    async def receive() -> dict[str, Any]:
        part = parts.pop(0) if parts else b""
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    return receive


def test_a_request_counts_its_prompts_times_n() -> None:
    assert metering.engine_requests(b'{"prompt": "hi", "n": 3}') == 3
    assert metering.engine_requests(b'{"prompt": ["a", "b", "c"], "n": 2}') == 6
    assert metering.engine_requests(b'{"prompt": [1, 2, 3]}') == 1  # one prompt of token ids
    assert metering.engine_requests(b'{"prompt": [[1, 2], [3]]}') == 2
    assert metering.engine_requests(b'{"messages": [{"role": "user", "content": "x"}], "n": 4}') == 4
    for bad in (b"not json", b"[]", b'{"n": true}', b'{"n": -2}', b'{"n": 100000000}'):
        assert metering.engine_requests(bad) == 1


def test_quota_middleware_weighs_a_request_by_its_prompts_and_sees_the_whole_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One HTTP request with many prompts and n > 1 used to be admitted as one (the second review)."""
    with metered_model(tmp_path, {"max_requests": 5}) as (meter, _, _):
        monkeypatch.setitem(metering._meterings, "demo", meter)
        seen: list[bytes] = []

        async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            seen.append((await receive())["body"])
            await send({"type": "http.response.start", "status": 200, "headers": []})

        def post(data: bytes) -> int:
            sent: list[MutableMapping[str, Any]] = []

            async def send(message: MutableMapping[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/completions", "client": ("10.0.0.3", 1)}
            asyncio.run(metering.QuotaMiddleware(app)(scope, body(data), send))
            return int(sent[0]["status"])

        many = b'{"prompt": ["a", "b", "c"], "n": 2}'
        assert post(many) == 429 and seen == []
        assert post(b'{"prompt": "one"}') == 200 and seen == [b'{"prompt": "one"}']  # the body, whole, replayed
        monkeypatch.setattr(metering, "MAX_BODY", 16)
        assert post(b'{"prompt": "seventeen bytes and more"}') == 413 and len(seen) == 1  # not read without end
        meter.close()


def test_quota_middleware_reserves_the_requests_it_admitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent requests against 3 left: 3 admitted, the others refused while those run (the review
    found 50 of 50 admitted)."""
    with metered_model(tmp_path, {"max_requests": 3}) as (meter, _, _):
        monkeypatch.setitem(metering._meterings, "demo", meter)

        async def main() -> list[int]:
            gate = asyncio.Event()

            async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
                await gate.wait()
                await send({"type": "http.response.start", "status": 200, "headers": []})

            async def one() -> int:
                sent: list[MutableMapping[str, Any]] = []

                async def send(message: MutableMapping[str, Any]) -> None:
                    sent.append(message)

                scope = {"type": "http", "method": "POST", "path": "/v1/completions", "client": ("10.0.0.9", 1)}
                await metering.QuotaMiddleware(app)(scope, body(b'{"prompt": "hi"}'), send)
                return int(sent[0]["status"])

            calls = [asyncio.create_task(one()) for _ in range(8)]
            await asyncio.sleep(0.2)
            gate.set()
            return sorted(await asyncio.gather(*calls))

        assert asyncio.run(main()) == [200] * 3 + [429] * 5
        meter.close()


def test_quota_middleware_rate_limits_per_client_and_reports_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with metered_model(tmp_path, {"metered": True, "rate": 0.5}) as (meter, usage_log, g):
        monkeypatch.setitem(metering._meterings, "demo", meter)
        served: list[str] = []

        async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            served.append(scope["path"])

        def call(path: str, client: str, method: str = "POST") -> list[MutableMapping[str, Any]]:
            sent: list[MutableMapping[str, Any]] = []

            async def send(message: MutableMapping[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "method": method, "path": path, "client": (client, 5000)}
            asyncio.run(metering.QuotaMiddleware(app)(scope, body(b"{}"), send))
            return sent

        assert call("/v1/completions", "10.0.0.1") == [] and served == ["/v1/completions"]
        refused = call("/v1/chat/completions", "10.0.0.1")
        assert refused[0]["status"] == 429 and (b"retry-after", b"2") in refused[0]["headers"]
        error = json.loads(refused[1]["body"])["error"]
        assert error["type"] == "rate_limit_exceeded" and "0.5 requests per second" in error["message"]
        assert call("/v1/completions", "10.0.0.2") == []  # per client
        assert call("/tokenize", "10.0.0.1") == [] and call("/v1/models", "10.0.0.1", "GET") == []
        assert served == ["/v1/completions", "/v1/completions", "/tokenize", "/v1/models"]

        meter.count(Usage(requests=2, items=2, input_tokens=9, output_tokens=4))
        meter.close()
        verifier = ChainVerifier()
        entries = [verifier.add(line) for line in usage_log.read_bytes().splitlines()]
        assert [(e.grant, e.delta) for e in entries if e.kind == "usage"] == [
            (g["grant_id"], Usage(requests=2, items=2, input_tokens=9, output_tokens=4))
        ]
