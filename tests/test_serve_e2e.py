"""End to end on loopback: ResNet-50 (ONNX and TorchScript) sealed to the key service -> grant -> agent ->
`modelseal serve` -> tritonclient gRPC and HTTP over mTLS return outputs identical to the plaintext model
run directly in the same framework. Revoking the grant unloads the models at the next renewal; a re-grant
brings them back without restarting the server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from modelseal.pki import identity_of_cert_file
from modelseal.release.recipient import KeyserverRecipient

from .services import Agent, KeyServer, wait_for
from .serving import ServeProcess, Tls, add_model, export_onnx, export_torchscript, infer_grpc, infer_http, resnet50
from .test_keyserver import grant

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

pytest.importorskip("tritonclient.grpc")
SHAPE = (3, 224, 224)


def test_resnet50_sealed_served_revoked_and_regranted(renewing_keyserver: KeyServer, tmp_path: Path) -> None:
    keyserver = renewing_keyserver
    import onnxruntime as ort
    import torch
    from tritonclient.utils import InferenceServerException

    model = resnet50()
    onnx_bytes, ts_bytes = export_onnx(model, SHAPE), export_torchscript(model, SHAPE)
    with keyserver.admin() as admin:
        admin.call("POST", "/v1/admin/models", {"model": "resnet50"})
    recipient = [KeyserverRecipient(keyserver.url, "resnet50", token=keyserver.token, ca=keyserver.ca)]
    repo = tmp_path / "repo"
    add_model(repo, "resnet50_onnx", "onnxruntime_onnx", onnx_bytes, SHAPE, 1000, recipients=recipient)  # type: ignore[arg-type]
    add_model(repo, "resnet50_torch", "pytorch_libtorch", ts_bytes, SHAPE, 1000, recipients=recipient)  # type: ignore[arg-type]
    assert not list(repo.rglob("*.onnx")) and not list(repo.rglob("*.pt"))  # only sealed files on disk

    host_cert = keyserver.host_cert("inference-host")
    g = grant(keyserver, "resnet50", identity_of_cert_file(host_cert[0]).spki)
    agent = Agent(keyserver, host_cert, tmp_path).start()
    tls = Tls(tmp_path / "serve-pki")
    client = tls.client("app")
    server = ServeProcess(repo, tmp_path / "serve.log", tls=tls,
                          extra=["-i", f"agent:{agent.socket}", "--key-check", "0.5", "--retry", "1"])  # fmt: skip
    try:
        batch = np.random.default_rng(0).standard_normal((2, *SHAPE), dtype=np.float32)
        expected_onnx = ort.InferenceSession(onnx_bytes).run(["output"], {"input": batch})[0]
        with torch.inference_mode():
            expected_torch = torch.jit.load(io.BytesIO(ts_bytes))(torch.from_numpy(batch)).numpy()
        assert np.isfinite(expected_onnx).all()
        grpc, http = server.grpc_client(client), server.http_client(client)
        np.testing.assert_array_equal(infer_grpc(grpc, "resnet50_onnx", batch), expected_onnx)
        np.testing.assert_array_equal(infer_http(http, "resnet50_onnx", batch), expected_onnx)
        np.testing.assert_array_equal(infer_grpc(grpc, "resnet50_torch", batch), expected_torch)
        np.testing.assert_array_equal(infer_http(http, "resnet50_torch", batch), expected_torch)

        with keyserver.admin() as admin:
            admin.call("POST", f"/v1/admin/grants/{g['grant_id']}/revoke", {"reason": "licence ended"})
        wait_for(lambda: not grpc.is_model_ready("resnet50_onnx") and not grpc.is_model_ready("resnet50_torch"),
                 30, "the server to unload the models")  # fmt: skip
        with pytest.raises(InferenceServerException, match="revoked") as refused:
            infer_grpc(grpc, "resnet50_onnx", batch)
        assert "UNAVAILABLE" in str(refused.value.status())
        index = {m["name"]: m for m in http.get_model_repository_index()}
        assert (
            index["resnet50_torch"]["state"] == "UNAVAILABLE" and "licence ended" in index["resnet50_torch"]["reason"]
        )

        grant(keyserver, "resnet50", identity_of_cert_file(host_cert[0]).spki)  # no server restart
        wait_for(lambda: grpc.is_model_ready("resnet50_onnx") and grpc.is_model_ready("resnet50_torch"),
                 30, "the models to come back")  # fmt: skip
        np.testing.assert_array_equal(infer_grpc(grpc, "resnet50_onnx", batch), expected_onnx)
    finally:
        assert server.stop() == 0  # graceful shutdown
        agent.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "unloaded: key" in log and "licence ended" in log
