"""The end-to-end demo behind ``modelseal demo``: owner seals, key service releases, server infers.

It plays both sides on one machine, with real processes and real TLS on loopback:

1. The owner builds a small image classifier (ONNX), starts a key service (``modelseal keyserver``,
   SQLite, local master key), registers the model and seals it with the ``keyserver`` recipient
   (publisher signature): the file carries only a key id. It lands in a Triton-layout model repository.
2. The owner issues the host a client certificate and grants it the model under a metered licence
   (1000 requests a day).
3. The host runs ``modelseal agent`` (fetches the key over mTLS, keeps it in locked memory) and
   ``modelseal serve`` (decrypts the model in memory with the agent's key, serves KServe V2 over HTTP and
   gRPC with mTLS). A client application sends an image over HTTPS with its own certificate; the answer
   is compared with the plaintext model run directly in ONNX Runtime. The server counts the request, the
   agent signs it into its usage log, its next lease renewal carries it to the key service, and the
   owner reads it in the usage report.
4. The owner revokes the grant; at the next lease renewal the agent drops the key, the server unloads
   the model, and requests get a clear "unavailable: ... revoked" answer.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelseal.crypto.signing import Signer
from modelseal.devstack import Agent, KeyServer, Serve, free_port, wait_for
from modelseal.errors import MissingDependencyError, ServiceError
from modelseal.sealing.writer import seal

CONFIG = """name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
"""


def classifier_onnx(rng: np.random.Generator) -> bytes:
    """conv 3x3 -> ReLU -> global average pool -> linear, as an ONNX model with random weights."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise MissingDependencyError("the demo needs onnx and onnxruntime: pip install 'modelseal[onnx]'") from None
    weights = {
        "conv.weight": rng.standard_normal((16, 3, 3, 3), dtype=np.float32) * 0.2,
        "conv.bias": rng.standard_normal(16, dtype=np.float32) * 0.1,
        "fc.weight": rng.standard_normal((10, 16), dtype=np.float32) * 0.2,
        "fc.bias": rng.standard_normal(10, dtype=np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["image", "conv.weight", "conv.bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_demo(workdir: Path, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    import httpx

    os_env_telemetry()
    import onnxruntime as ort

    from modelseal import pki
    from modelseal.release.recipient import KeyserverRecipient

    say = log or (lambda _m: None)
    workdir = workdir.resolve()
    owner, host = workdir / "owner", workdir / "host"
    owner.mkdir(parents=True, exist_ok=True)
    host.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    model_bytes = classifier_onnx(rng)
    plain = owner / "classifier.onnx"
    plain.write_bytes(model_bytes)
    say(f"owner: built the plaintext model {plain} ({len(model_bytes)} bytes, ONNX)")

    port = free_port()  # in the state directory's name: a second run in the same workdir gets a fresh one
    with KeyServer(owner / f"keyserver-{port}", port=port, leases={"renew_after_s": 1}) as ks, ks.admin() as admin:
        say(f"owner: key service up on {ks.url} (SQLite, local master key, TLS 1.3 with its own CA)")
        admin.add_model("demo-classifier", "modelseal demo")
        signer = Signer.generate()
        repo = host / "models"
        (repo / "classifier" / "1").mkdir(parents=True, exist_ok=True)
        (repo / "classifier" / "config.pbtxt").write_text(CONFIG)
        sealed = repo / "classifier" / "1" / "model.onnx.sealed"
        t0 = time.perf_counter()
        recipient = KeyserverRecipient(ks.url, "demo-classifier", token=ks.token, ca=ks.ca)
        seal(plain, sealed, [recipient], model_id="demo-classifier", signer=signer, force=True)
        t1 = time.perf_counter()
        say(f"owner: sealed it into the host's model repository {sealed} (signed by {signer.public[:20]}...)")

        cert = ks.host_cert("demo-host", "spiffe://demo.example/host/1")
        terms = {"max_requests": 1000, "period_s": 86400, "licence": "demo-licence"}  # metered: docs/licensing.md
        grant = admin.add_grant({"model": "demo-classifier", "identity": "spiffe://demo.example/host/1",
                                 "terms": terms})  # fmt: skip
        say(f"owner: issued the host a client certificate and granted it ({grant['grant_id']}, licence "
            f"demo-licence: 1000 requests a day, usage reported)")  # fmt: skip

        app_cert = ks.host_cert("demo-app")
        server_tls = ks.issue("demo-server", server_names=["127.0.0.1", "localhost"])
        with tempfile.TemporaryDirectory(prefix="modelseal-demo-") as sockets:  # short: sun_path is 108 bytes
            agent = Agent(ks, cert, host, name="agent", socket=Path(sockets) / "agent.sock", prefetch=False,
                          usage_log=str(host / "usage.log"))  # fmt: skip
            serve_args = ["-i", f"agent:{agent.socket}", "--key-check", "0.5", "--trusted-signer", signer.public]
            serve = Serve(repo, host / "serve.log", args=serve_args, tls=server_tls, client_ca=ks.ca)
            client_tls = pki.client_context(ks.ca, *app_cert)
            with agent, serve, httpx.Client(base_url=serve.base_url, verify=client_tls, timeout=10) as app:
                wait_for(lambda: app.get("/v2/models/classifier/ready").status_code == 200, 30,
                         f"the sealed classifier to load (log: {serve.log})")  # fmt: skip
                say(
                    f"host:  agent on {agent.socket}; modelseal serve on {serve.base_url} (KServe V2 HTTP + gRPC, mTLS)"
                )
                image = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
                request = {"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                       "data": image.ravel().tolist()}]}  # fmt: skip
                t2 = time.perf_counter()
                answer = app.post("/v2/models/classifier/infer", json=request)
                t3 = time.perf_counter()
                if answer.status_code != 200:
                    raise ServiceError(answer.status_code, "infer", f"inference failed: {answer.text[:300]}")
                served = np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32)
                plain_logits = ort.InferenceSession(model_bytes).run(["logits"], {"image": image})[0].ravel()
                identical = bool(np.array_equal(served, plain_logits))
                label = int(np.argmax(served))
                say(f"app:   POST /v2/models/classifier/infer -> class {label}, "
                    f"logits {np.array2string(served[:4], precision=3)}... ({1000 * (t3 - t2):.1f} ms)")  # fmt: skip
                say(f"check: outputs identical to the plaintext model in ONNX Runtime: {identical}")
                if not identical:
                    raise AssertionError("the served sealed model's output differs from the plaintext model")
                found: list[dict[str, Any]] = []
                wait_for(lambda: _reported(admin, grant["grant_id"], found), 30, "the usage to reach the key service")
                usage = found[0]
                say(f"owner: usage report for licence {usage['licence']}: {usage['requests']} request, "
                    f"{usage['items']} item (signed by the host's agent, sent with its lease renewal)")  # fmt: skip

                admin.revoke_grant(grant["grant_id"], "demo: licence ended")
                say("owner: revoked the grant")
                revoked = _wait_for_refusal(app, request)
                say(f"app:   next request refused: {revoked}")
    return {
        "sealed": str(sealed),
        "class": label,
        "logits": served.tolist(),
        "identical_to_plain": identical,
        "seal_ms": 1000 * (t1 - t0),
        "infer_ms": 1000 * (t3 - t2),
        "after_revocation": revoked,
        "usage": {k: usage[k] for k in ("licence", "requests", "items")},
    }


def _reported(admin: Any, grant_id: str, found: list[dict[str, Any]]) -> bool:
    """Whether the key service has accepted the host's report of the demo's request (its row into
    ``found``); asks every 0.25 s."""
    rows = admin.usage(grant=grant_id)["usage"]
    if rows and rows[0]["requests"] >= 1:
        found.append(rows[0])
        return True
    time.sleep(0.25)
    return False


def os_env_telemetry() -> None:
    import os

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # ORT writes under ~/.cache otherwise


def _wait_for_refusal(app: Any, request: dict[str, Any], timeout: float = 15) -> str:
    """Ask until the server, after the agent dropped the revoked key, has unloaded the model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = app.post("/v2/models/classifier/infer", json=request)
        if answer.status_code != 200:
            return f"HTTP {answer.status_code}: {answer.json().get('error')}"
        time.sleep(0.25)
    raise AssertionError("the revoked model was still served after the renewal interval")
