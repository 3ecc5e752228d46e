"""`modelseal serve` with the official tritonclient (HTTP and gRPC, JSON and binary) over mTLS: sealed ONNX
and TorchScript models answer exactly like the plaintext model run directly; bad requests get clear 4xx /
gRPC errors and the server keeps serving."""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .services import wait_for
from .serving import ServeProcess, Tls, add_model, export_onnx, export_torchscript, infer_grpc, infer_http, small_cnn
from .write_audit import WRITE_AUDIT_HOOK

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

pytest.importorskip("tritonclient.grpc")
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import torch

    from modelseal.recipients.hpke import KEMS, HpkeIdentity

    tmp = tmp_path_factory.mktemp("serve")
    identity = HpkeIdentity.generate(KEMS["x25519"])
    key_file = tmp / "host.key"
    identity.save(key_file)
    model = small_cnn()
    repo = tmp / "repo"
    onnx_bytes, ts_bytes = export_onnx(model, SHAPE), export_torchscript(model, SHAPE)
    recipient = [identity.recipient]
    add_model(repo, "cnn_onnx", "onnxruntime_onnx", onnx_bytes, SHAPE, 10, recipients=recipient)
    add_model(repo, "cnn_torch", "pytorch_libtorch", ts_bytes, SHAPE, 10, recipients=recipient)
    add_model(repo, "cnn_batched", "onnxruntime_onnx", onnx_bytes, SHAPE, 10, recipients=recipient,
              instances=2, delay_us=20000)  # fmt: skip
    add_model(repo, "cnn_plain", "onnxruntime_onnx", onnx_bytes, SHAPE, 10, recipients=None)
    add_model(repo, "cnn_slow", "onnxruntime_onnx", onnx_bytes, SHAPE, 10, recipients=None, delay_us=500_000)
    add_state_dict_model(repo, model, recipient)
    import shutil  # TorchScript behind a config with one input too many (checked at load, issue 14 item 12)

    shutil.copytree(repo / "cnn_torch", repo / "torch_arity")
    config = (repo / "cnn_torch" / "config.pbtxt").read_text().replace("cnn_torch", "torch_arity")
    (repo / "torch_arity" / "config.pbtxt").write_text(
        config.replace(
            "dims: [ 3, 16, 16 ] }", 'dims: [ 3, 16, 16 ] }, { name: "mask" data_type: TYPE_FP32 dims: [ 1 ] }'
        )
    )
    add_model(repo, "broken_plain", "onnxruntime_onnx", b"not an onnx model", SHAPE, 10, recipients=None)
    tampered = add_model(repo, "broken_sealed", "onnxruntime_onnx", onnx_bytes, SHAPE, 10, recipients=recipient)
    sealed_file = tampered / "model.onnx.sealed"
    data = bytearray(sealed_file.read_bytes())
    data[-100] ^= 1
    sealed_file.write_bytes(bytes(data))
    tls = Tls(tmp / "pki")
    extra = ["-i", str(key_file), "--audit-log", str(tmp / "audit.jsonl"), "--log-json"]
    server = ServeProcess(repo, tmp / "serve.log", tls=tls, extra=extra)
    import onnxruntime as ort

    reference = {
        "onnx": ort.InferenceSession(onnx_bytes),
        "torch": torch.jit.load(__import__("io").BytesIO(ts_bytes)),
        "module": model,
    }
    try:
        yield {"server": server, "tls": tls, "client": tls.client("client-a"), "ref": reference, "tmp": tmp}
    finally:
        server.stop()


ENTRY_POINT = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 16, 10))
"""


def add_state_dict_model(repo: Path, model: Any, recipients: list[Any]) -> None:
    """A state dict sealed as safetensors, served through the config's entry point (REPO/NAME/cnnarch.py)."""
    from safetensors.torch import save_file

    import modelseal

    version = repo / "cnn_state" / "1"
    version.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(repo / "state.safetensors"))
    modelseal.seal(repo / "state.safetensors", version / "model.safetensors.sealed", recipients)
    (repo / "state.safetensors").unlink()
    (repo / "cnn_state" / "cnnarch.py").write_text(ENTRY_POINT)
    config = (repo / "cnn_torch" / "config.pbtxt").read_text().replace("cnn_torch", "cnn_state")
    config += 'parameters { key: "entry_point" value: { string_value: "cnnarch:build" } }\n'
    (repo / "cnn_state" / "config.pbtxt").write_text(config)


def plain_onnx(ref: dict[str, Any], batch: np.ndarray) -> np.ndarray:
    return ref["onnx"].run(["output"], {"input": batch})[0]


def plain_state(ref: dict[str, Any], batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return ref["module"](torch.from_numpy(batch)).numpy()


def plain_torch(ref: dict[str, Any], batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return ref["torch"](torch.from_numpy(batch)).numpy()


def test_sealed_models_answer_like_the_plaintext_model(served: dict[str, Any]) -> None:
    server, cert, ref = served["server"], served["client"], served["ref"]
    batch = np.random.default_rng(1).standard_normal((4, *SHAPE), dtype=np.float32)
    http, grpc = server.http_client(cert), server.grpc_client(cert)
    assert http.is_server_live() and http.is_server_ready() and grpc.is_server_ready()
    for model, expected in (("cnn_onnx", plain_onnx(ref, batch)), ("cnn_torch", plain_torch(ref, batch)),
                            ("cnn_plain", plain_onnx(ref, batch)), ("cnn_state", plain_state(ref, batch))):  # fmt: skip
        np.testing.assert_array_equal(infer_http(http, model, batch), expected)
        np.testing.assert_array_equal(infer_http(http, model, batch, binary=False), expected)
        np.testing.assert_array_equal(infer_grpc(grpc, model, batch), expected)
    meta = grpc.get_model_metadata("cnn_onnx", as_json=True)
    assert meta["inputs"][0]["shape"] == ["-1", "3", "16", "16"] and meta["platform"] == "onnxruntime_onnx"
    assert http.get_model_metadata("cnn_torch")["outputs"][0]["shape"] == [-1, 10]
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["cnn_onnx"]["state"] == "READY"


def test_dynamic_batching_with_two_instances(served: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, cert, ref = served["server"], served["client"], served["ref"]
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((1, *SHAPE), dtype=np.float32) for _ in range(16)]

    def one(batch: np.ndarray) -> np.ndarray:
        return infer_grpc(server.grpc_client(cert), "cnn_batched", batch)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, batches))
    for batch, result in zip(batches, results, strict=True):
        np.testing.assert_allclose(result, plain_onnx(ref, batch), rtol=1e-5, atol=1e-6)  # batched kernels
    metrics = httpx.get(f"https://{server.http}/metrics", verify=ssl_context(served)).text
    sizes = [
        line for line in metrics.splitlines() if line.startswith('modelseal_batch_size_count{model="cnn_batched"}')
    ]
    count = float(sizes[0].split()[-1])
    assert count < 16, "16 concurrent single requests should have been run in fewer batches"


def ssl_context(served: dict[str, Any]) -> ssl.SSLContext:
    from modelseal.pki import client_context

    return client_context(served["tls"].ca, *served["client"])


def test_client_without_certificate_is_refused(served: dict[str, Any]) -> None:
    from tritonclient.utils import InferenceServerException

    server = served["server"]
    with pytest.raises(Exception):  # the TLS handshake fails inside the client library
        server.http_client(None).is_server_live()
    with pytest.raises(InferenceServerException):
        server.grpc_client(None).is_server_live()
    foreign = Tls(served["tmp"] / "foreign-pki").client("mallory")
    with pytest.raises(InferenceServerException):
        server.grpc_client(foreign).is_server_live()
    assert server.grpc_client(served["client"]).is_server_live()  # still serving


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served: dict[str, Any]) -> None:
    from tritonclient.utils import InferenceServerException

    server, cert = served["server"], served["client"]
    grpc, http = server.grpc_client(cert), server.http_client(cert)
    good = np.zeros((1, *SHAPE), dtype=np.float32)
    cases = [
        (lambda c: infer_grpc(c, "nope", good), "unknown model 'nope'"),
        (lambda c: c.infer("cnn_onnx", [], model_version="7"), "no ready version"),
        (lambda c: infer_grpc(c, "cnn_onnx", np.zeros((1, 3, 8, 8), np.float32)), "the model expects [-1, 3, 16, 16]"),
        (lambda c: infer_grpc(c, "cnn_onnx", np.zeros((9, *SHAPE), np.float32)), "batch size must be 1..8"),
    ]
    for call, message in cases:
        with pytest.raises(InferenceServerException, match=re.escape(message)):
            call(grpc)
    import tritonclient.grpc as grpcclient

    wrong_type = grpcclient.InferInput("input", [1, *SHAPE], "FP64")
    wrong_type.set_data_from_numpy(good.astype(np.float64))
    with pytest.raises(InferenceServerException, match="must be FP32, got FP64"):
        grpc.infer("cnn_onnx", [wrong_type])

    raw = httpx.Client(base_url=f"https://{server.http}", verify=ssl_context(served))
    r = raw.post("/v2/models/cnn_onnx/infer", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = raw.post("/v2/models/cnn_onnx/infer", json={"inputs": [{"name": "input", "shape": [1, 3, 16, 16],
                                                                "datatype": "FP32", "data": [1.0]}]})  # fmt: skip
    assert r.status_code == 400 and "do not fill shape" in r.json()["error"]
    r = raw.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404
    r = raw.post("/v2/models/cnn_onnx/infer", content=b"x" * (65 * 1024 * 1024))
    assert r.status_code == 413 and "too large" in r.json()["error"]
    np.testing.assert_array_equal(infer_http(http, "cnn_onnx", good), plain_onnx(served["ref"], good))


def test_audit_records_name_the_client_and_hold_no_tensor_data(served: dict[str, Any]) -> None:
    from tritonclient.utils import InferenceServerException

    from modelseal.pki import identity_of_cert_file

    grpc = served["server"].grpc_client(served["client"])
    infer_grpc(grpc, "cnn_onnx", np.ones((1, *SHAPE), np.float32))
    with pytest.raises(InferenceServerException):
        infer_grpc(grpc, "no_such_model", np.ones((1, *SHAPE), np.float32))

    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in (served["tmp"] / "audit.jsonl").read_text().splitlines()]

    # gRPC sends an aborted call's status before the handler's audit record is written: wait for it
    wait_for(lambda: any(r["model"] == "no_such_model" for r in records()), 10, "the refusal's audit record")
    spki = identity_of_cert_file(served["client"][0]).spki
    assert any(r["client"] == spki and r["model"] == "cnn_onnx" and r["protocol"] == "grpc" for r in records())
    assert any(r["status"] == "not_found" and r["model"] == "no_such_model" for r in records())
    assert set(records()[0]) == {"ts", "protocol", "model", "version", "client", "status", "ms"}


def test_repository_unload_and_load(served: dict[str, Any]) -> None:
    from tritonclient.utils import InferenceServerException

    grpc = served["server"].grpc_client(served["client"])
    grpc.unload_model("cnn_plain")
    assert not grpc.is_model_ready("cnn_plain")
    with pytest.raises(InferenceServerException, match="not ready"):
        infer_grpc(grpc, "cnn_plain", np.zeros((1, *SHAPE), np.float32))
    grpc.load_model("cnn_plain")
    assert grpc.is_model_ready("cnn_plain")


def test_server_process_cannot_dump_core(served: dict[str, Any]) -> None:
    limits = open(f"/proc/{served['server'].proc.pid}/limits").read()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]


SERVE_PROBE = (
    """
import asyncio, json, os, sys
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
import numpy as np, torch, onnxruntime, grpc, grpc_tools  # frameworks first: imports may write caches
from modelseal.serve.metrics import Metrics
from modelseal.serve.models import ModelManager
from modelseal.serve.protocol import inference, model_config
from modelseal.serve.repository import Repository
inference(); model_config()
"""
    + WRITE_AUDIT_HOOK
    + """
async def main():
    manager = ModelManager(Repository(sys.argv[1]), sys.argv[2], Metrics())
    outputs = []
    for name in ("cnn_onnx", "cnn_torch"):
        await manager.load(name)
        x = np.ones((1, 3, 16, 16), np.float32)
        outputs.append((await manager.infer(manager.get(name), {"input": x}, []))["output"].shape)
    await manager.close()
    return outputs
print(json.dumps({"writes": writes, "outputs": [list(o) for o in asyncio.run(main())]}))
"""
)


def test_serving_sealed_models_writes_nothing(served: dict[str, Any]) -> None:
    """Loading, running and unloading sealed models opens no file for writing (Python audit hook)."""
    import subprocess
    import sys

    tmp = served["tmp"]
    result = subprocess.run([sys.executable, "-c", SERVE_PROBE, str(tmp / "repo"), str(tmp / "host.key")],
                            capture_output=True, text=True, check=True)  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outputs"] == [[1, 10], [1, 10]]
    assert report["writes"] == []


def test_models_that_fail_to_load_are_unavailable_with_the_reason(served: dict[str, Any]) -> None:
    from tritonclient.utils import InferenceServerException

    http = served["server"].http_client(served["client"])
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["broken_plain"]["state"] == "UNAVAILABLE" and "runtime refused it" in index["broken_plain"]["reason"]
    assert index["broken_sealed"]["state"] == "UNAVAILABLE"
    assert index["torch_arity"]["state"] == "UNAVAILABLE"
    assert (
        "declares 2 input(s) ['input', 'mask'], but the PyTorch model's forward takes" in index["torch_arity"]["reason"]
    )
    assert "authentication" in index["broken_sealed"]["reason"].lower()
    with pytest.raises(InferenceServerException, match="not ready"):
        infer_http(http, "broken_sealed", np.zeros((1, *SHAPE), np.float32))
    assert index["cnn_onnx"]["state"] == "READY"  # the others serve


def test_logs_are_json_lines_without_key_material(served: dict[str, Any]) -> None:
    lines = (served["tmp"] / "serve.log").read_text().splitlines()
    grpc_core = re.compile(r"^[IWE]\d{4} ")  # gRPC's C core logs TLS handshake failures in its own format
    records = [json.loads(line) for line in lines if not grpc_core.match(line)]
    assert any("server ready" in r["message"] for r in records)
    assert all(set(r) >= {"ts", "level", "logger", "message"} for r in records)
    key_line = next(line for line in (served["tmp"] / "host.key").read_text().splitlines() if line[:1] not in "#")
    assert key_line.split(":", 1)[1] not in "\n".join(lines)


def test_sigterm_drains_in_flight_requests(served: dict[str, Any]) -> None:
    """Requests in flight when SIGTERM arrives are answered; the server then exits 0. (cnn_slow's batcher
    holds requests for 0.5 s, so they are certainly in flight when the signal comes 0.2 s in.)"""
    import signal
    import threading

    tmp = served["tmp"]
    server = ServeProcess(tmp / "repo", tmp / "drain.log", tls=served["tls"],
                          extra=["-i", str(tmp / "host.key"), "--model", "cnn_slow"])  # fmt: skip
    batch = np.ones((1, *SHAPE), np.float32)
    clients = [server.grpc_client(served["client"]) for _ in range(4)]
    assert all(c.is_server_live() for c in clients)  # connected before the clock starts
    results: list[object] = []
    go = threading.Barrier(len(clients) + 1)

    def one(client: Any) -> None:
        go.wait()
        try:
            results.append(infer_grpc(client, "cnn_slow", batch).shape)
        except Exception as exc:  # recorded: the assertion shows it
            results.append(exc)

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    go.wait()
    time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert server.proc.wait(30) == 0
    assert results == [(1, 10)] * len(clients), results


def test_a_failed_reload_keeps_serving_the_loaded_version(served: dict[str, Any]) -> None:
    import shutil

    from tritonclient.utils import InferenceServerException

    tmp = served["tmp"]
    repo = tmp / "reload-repo"
    shutil.copytree(tmp / "repo" / "cnn_onnx", repo / "cnn_onnx")
    server = ServeProcess(repo, tmp / "reload.log", extra=["-i", str(tmp / "host.key")])
    try:
        client = server.grpc_client()
        (repo / "cnn_onnx" / "2").mkdir()
        (repo / "cnn_onnx" / "2" / "model.onnx").write_bytes(b"not a model")
        with pytest.raises(InferenceServerException, match="cannot be loaded"):
            client.load_model("cnn_onnx")
        batch = np.ones((1, *SHAPE), np.float32)
        np.testing.assert_array_equal(infer_grpc(client, "cnn_onnx", batch), plain_onnx(served["ref"], batch))
        (entry,) = server.http_client().get_model_repository_index()
        assert entry["state"] == "READY" and entry["version"] == "1" and "reload failed" in entry["reason"]
    finally:
        assert server.stop() == 0
