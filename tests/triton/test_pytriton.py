"""``modelseal.pytriton.bind`` in a real PyTriton (its tritonserver and relay): a sealed ONNX model answers
tritonclient exactly as ONNX Runtime run directly, and a sealed file for another key is a one-line error.
PyTriton 0.7 needs numpy < 2: scripts/test.sh runs this file in .venv-triton."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelseal.errors import ModelsealError
from modelseal.recipients.hpke import HpkeIdentity

from ..services import free_port

pytestmark = pytest.mark.slow
pytest.importorskip("pytriton")
torch = pytest.importorskip("torch")


def test_pytriton_serves_a_sealed_model(tmp_path: Path, host: HpkeIdentity, host_key: Path,
                                        other_host: HpkeIdentity) -> None:  # fmt: skip
    import onnxruntime as ort
    import tritonclient.http as httpclient
    from bench.models import export_onnx
    from pytriton.triton import Triton, TritonConfig

    import modelseal.pytriton

    torch.manual_seed(0)
    onnx_bytes = export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval(), (3, 4))
    (tmp_path / "model.onnx").write_bytes(onnx_bytes)
    sealed = tmp_path / "model.onnx.sealed"
    modelseal.seal(tmp_path / "model.onnx", sealed, [host.recipient], as_bundle=True)
    (tmp_path / "model.onnx").unlink()
    batch = np.random.default_rng(0).standard_normal((4, 3, 4), dtype=np.float32)
    expected = ort.InferenceSession(onnx_bytes).run(["output"], {"input": batch})[0]
    http = free_port()
    config = TritonConfig(http_address="127.0.0.1", http_port=http, grpc_address="127.0.0.1", grpc_port=free_port(),
                          metrics_port=free_port(), exit_timeout_secs=5)  # fmt: skip
    with Triton(config=config) as triton:
        with pytest.raises(ModelsealError, match="none of your identities"):
            other = tmp_path / "other.key"
            other_host.save(other)
            modelseal.pytriton.bind(triton, "wrong", sealed, identity=str(other))
        model = modelseal.pytriton.bind(triton, "tiny", sealed, identity=str(host_key))
        triton.run()
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        np.testing.assert_array_equal(client.infer("tiny", [inp]).as_numpy("output"), expected)
        model.close()
        with pytest.raises(Exception, match="unloaded"):
            client.infer("tiny", [inp])
