"""BYTES, BF16 and FP16 tensors through a real `modelseal serve` with tritonclient, HTTP (JSON and binary)
and gRPC: an ONNX string model, an ONNX and a TorchScript bfloat16 model, an ONNX float16 model and a
TensorFlow string model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from .serving import ServeProcess

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier
pytest.importorskip("tritonclient.grpc")
BF16 = np.dtype(ml_dtypes.bfloat16)


def config(name: str, platform: str, datatype: str, dims: str, out: str = "y", batch: int = 0) -> str:
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {batch}\n'
            f'input [ {{ name: "x" data_type: {datatype} dims: [ {dims} ] }} ]\n'
            f'output [ {{ name: "{out}" data_type: {datatype} dims: [ {dims} ] }} ]\n')  # fmt: skip


def onnx_bytes(elem: int, cast: bool = False) -> bytes:
    from onnx import TensorProto, helper

    if cast:  # y = x + x through float (ONNX Runtime's CPU has no bfloat16 Add)
        nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("Add", ["f", "f"], ["g"]),
                 helper.make_node("Cast", ["g"], ["y"], to=elem)]
    else:
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["n", 2])],
                              [helper.make_tensor_value_info("y", elem, ["n", 2])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()  # type: ignore[no-any-return]


def add(repo: Path, name: str, text: str, filename: str, data: bytes | None = None) -> Path:
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(text)
    if data is not None:
        (version / filename).write_bytes(data)
    return version / filename


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import torch
    from onnx import TensorProto

    tmp = tmp_path_factory.mktemp("dtypes")
    repo = tmp / "repo"
    add(repo, "onnx_str", config("onnx_str", "onnxruntime_onnx", "TYPE_STRING", "-1, 2"), "model.onnx",
        onnx_bytes(TensorProto.STRING))  # fmt: skip
    add(repo, "onnx_bf16", config("onnx_bf16", "onnxruntime_onnx", "TYPE_BF16", "-1, 2"), "model.onnx",
        onnx_bytes(TensorProto.BFLOAT16, cast=True))  # fmt: skip
    add(repo, "onnx_fp16", config("onnx_fp16", "onnxruntime_onnx", "TYPE_FP16", "2", batch=4), "model.onnx",
        onnx_bytes(TensorProto.FLOAT16))  # fmt: skip

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    pt = add(repo, "torch_bf16", config("torch_bf16", "pytorch_libtorch", "TYPE_BF16", "2", out="OUTPUT__0",
                                        batch=4), "model.pt")  # fmt: skip
    torch.jit.save(torch.jit.script(Double()), str(pt))
    tf = None
    if os.environ.get("CI") or __import__("importlib").util.find_spec("tensorflow"):
        from .test_serve_tensorflow import tensorflow

        tf = tensorflow()

        class Upper(tf.Module):  # type: ignore[misc,name-defined]
            @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.string, name="x")])
            def serve(self, x: Any) -> dict[str, Any]:
                return {"y": tf.strings.upper(x)}

        model = Upper()
        saved = add(repo, "tf_str", config("tf_str", "tensorflow_savedmodel", "TYPE_STRING", "2", batch=4),
                    "model.savedmodel")  # fmt: skip
        tf.saved_model.save(model, str(saved), signatures={"serving_default": model.serve})
    server = ServeProcess(repo, tmp / "serve.log")
    try:
        yield server
    finally:
        server.stop()


def http(server: Any, model: str, x: np.ndarray, datatype: str, binary: bool, out: str = "y") -> np.ndarray:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    requested = httpclient.InferRequestedOutput(out, binary_data=binary)
    return server.http_client().infer(model, [inp], outputs=[requested]).as_numpy(out)  # type: ignore[no-any-return]


def grpc(server: Any, model: str, x: np.ndarray, datatype: str, out: str = "y") -> np.ndarray:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    requested = grpcclient.InferRequestedOutput(out)
    return server.grpc_client().infer(model, [inp], outputs=[requested]).as_numpy(out)  # type: ignore[no-any-return]


def strings(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


@pytest.mark.parametrize("model", ["onnx_str", "tf_str"])
def test_bytes_round_trip(served: Any, model: str) -> None:
    if model == "tf_str" and not (Path(served.repository) / "tf_str").exists():
        pytest.skip("TensorFlow is not installed")
    x = strings(["héllo".encode(), b"", b"a b", "日本".encode()], (2, 2))
    want = x if model == "onnx_str" else strings([v.upper() for v in x.ravel()], (2, 2))  # ASCII only
    assert http(served, model, x, "BYTES", binary=True).tolist() == want.tolist()
    assert grpc(served, model, x, "BYTES").tolist() == want.tolist()
    as_json = http(served, model, x, "BYTES", binary=False)  # tritonclient reads JSON strings back as str
    assert [v.encode() for v in as_json.ravel()] == want.ravel().tolist()
    empty = strings([], (0, 2))  # zero-size (tf_str batches: a batch of 0 is refused there, as for any type)
    if model == "onnx_str":
        assert http(served, model, empty, "BYTES", binary=True).shape == (0, 2)
        assert grpc(served, model, empty, "BYTES").shape == (0, 2)
    if model == "tf_str":  # bytes that are not UTF-8 pass through binary data untouched
        raw = strings([b"\xff\xfe", b"ok"], (1, 2))
        assert http(served, model, raw, "BYTES", binary=True).tolist() == [[b"\xff\xfe", b"OK"]]
        assert grpc(served, model, raw, "BYTES").tolist() == [[b"\xff\xfe", b"OK"]]


@pytest.mark.parametrize(("model", "out"), [("onnx_bf16", "y"), ("torch_bf16", "OUTPUT__0")])
def test_bf16_round_trip_as_binary_data(served: Any, model: str, out: str) -> None:
    from tritonclient.utils import InferenceServerException

    x = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=BF16)
    for got in (http(served, model, x, "BF16", binary=True, out=out), grpc(served, model, x, "BF16", out=out)):
        assert got.dtype == BF16 and np.array_equal(got, x * 2)
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("x", [2, 2], "BF16")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(InferenceServerException, match="BF16 data cannot be sent as JSON"):
        served.http_client().infer(model, [inp], outputs=[httpclient.InferRequestedOutput(out, binary_data=False)])


def test_fp16_in_json_binary_and_grpc(served: Any) -> None:
    x = np.array([[0.1, -65504.0], [6e-8, 2.5]], dtype=np.float16)  # finite: tritonclient writes bare Infinity
    for binary in (False, True):
        assert np.array_equal(http(served, "onnx_fp16", x, "FP16", binary=binary), x)
    assert np.array_equal(grpc(served, "onnx_fp16", x, "FP16"), x)
