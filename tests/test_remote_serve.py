"""Serving models whose sealed files live on an HTTP server: a ``modelseal-remote: URL`` pointer file in the
model repository, read by a running ``modelseal serve`` process (an ONNX model, one sealed file) and by the
TVM runtime (a sealed *directory* at a URL prefix: the pointer is a file, so the runtime must not take
``path.is_dir()`` for the answer). Answers must equal the plaintext model's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal
from modelseal.recipients.hpke import HpkeIdentity

from .remote_servers import range_server

pytestmark = pytest.mark.slow


def pointer(path: Path, url: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"modelseal-remote: {url}\n")
    return path


def test_the_tvm_runtime_loads_a_remote_sealed_directory(tmp_path: Path, host: HpkeIdentity) -> None:
    pytest.importorskip("tvm")
    from modelseal.serve.repository import ModelSpec
    from modelseal.serve.runtimes.tvm import TvmRuntime
    from modelseal.serve.source import open_source

    from .tvm_models import build_tiny

    site = tmp_path / "site"
    site.mkdir()
    model = build_tiny(tmp_path / "export")
    modelseal.seal(model.export_dir, site / "tiny", [host.recipient])  # model.so, params.safetensors, metadata.json
    with range_server(site) as (url, behaviour):
        spec = ModelSpec("tiny", tmp_path, "tvm", 8, (), ())
        # the member list of an HTTP directory comes from one member's header: name one after #
        target = pointer(tmp_path / "repo" / "1" / "model.tvm.sealed", url + "tiny/#metadata.json")
        with open_source(target, lambda: host) as source:
            assert source.directory and sorted(source.artifacts) == ["metadata.json", "model.so", "params.safetensors"]
            runtime = TvmRuntime(spec, source, 0)
        try:
            out = runtime.run({"x": model.batch}, ["y"])
            np.testing.assert_array_equal(out["y"], model.reference(model.batch))
        finally:
            runtime.close()
        assert {path.split("/")[0] for path, _a, _b in behaviour.requests} == {"tiny"}


def test_a_running_server_answers_from_a_pointer_file_like_the_plain_model(tmp_path: Path, host: HpkeIdentity,
                                                                           host_key: Path) -> None:  # fmt: skip
    """`modelseal serve` with ``1/model.onnx.sealed`` holding only ``modelseal-remote: http://...``: it loads
    the sealed ONNX model from the range server at start and answers tritonclient like onnxruntime on the
    plaintext model; the repository holds no model bytes at all."""
    pytest.importorskip("tritonclient.http")
    import onnxruntime as ort
    import tritonclient.http as httpclient
    from bench.models import CONFIG, export_onnx, small_cnn

    from .serving import ServeProcess

    shape = (3, 16, 16)
    onnx_bytes = export_onnx(small_cnn(), shape)
    site = tmp_path / "site"
    site.mkdir()
    (tmp_path / "model.onnx").write_bytes(onnx_bytes)
    modelseal.seal(tmp_path / "model.onnx", site / "cnn.onnx.sealed", [host.recipient], as_bundle=True)
    batch = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: batch})[0]
    repo = tmp_path / "repo"
    with range_server(site) as (url, behaviour):
        target = pointer(repo / "cnn" / "1" / "model.onnx.sealed", url + "cnn.onnx.sealed")
        (repo / "cnn" / "config.pbtxt").write_text(CONFIG.format(
            name="cnn", platform="onnxruntime_onnx", max_batch=8, dims=", ".join(map(str, shape)), classes=10,
            instances=1, batching=""))  # fmt: skip
        assert target.stat().st_size < 100  # the repository holds a URL, not the model
        server = ServeProcess(repo, tmp_path / "serve.log", extra=["-i", str(host_key)])
        try:
            client: Any = server.http_client()
            inp = httpclient.InferInput("input", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            got = client.infer("cnn", [inp], outputs=[httpclient.InferRequestedOutput("output")]).as_numpy("output")
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            assert behaviour.requests, "the server read the model from the range server"
        finally:
            assert server.stop() == 0
