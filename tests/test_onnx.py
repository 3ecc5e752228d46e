"""ONNX Runtime sessions from sealed models: outputs identical to the plaintext model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import modelseal  # noqa: E402
import modelseal.onnx  # noqa: E402
from modelseal.recipients.hpke import HpkeIdentity  # noqa: E402


def small_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((8 * 6 * 6, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


X = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)


def plain_output(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def test_single_file_onnx(tmp_path: Path, host: HpkeIdentity) -> None:
    onnx.save_model(small_cnn(), tmp_path / "m.onnx")
    modelseal.seal(tmp_path / "m.onnx", tmp_path / "m.onnx.sealed", [host.recipient])
    sess = modelseal.onnx.InferenceSession(tmp_path / "m.onnx.sealed", identity=host)
    np.testing.assert_array_equal(sess.run(None, {"x": X})[0], plain_output(tmp_path / "m.onnx"))


@pytest.mark.parametrize("as_directory", [False, True])
def test_onnx_with_external_data(tmp_path: Path, host: HpkeIdentity, as_directory: bool) -> None:
    src = tmp_path / "model"
    src.mkdir()
    onnx.save_model(
        small_cnn(),
        src / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (src / "weights.bin").stat().st_size > 0
    sealed = tmp_path / ("sealed_dir" if as_directory else "model.msb")
    if as_directory:
        modelseal.seal(src, sealed, [host.recipient])
    else:
        from modelseal.crypto.keys import new_dek
        from modelseal.format import bundle

        bundle.seal_path(src, sealed, [host.recipient], builder=bundle.new_builder("m", "1", new_dek()))
    sess = modelseal.onnx.InferenceSession(sealed, identity=host)
    np.testing.assert_array_equal(sess.run(None, {"x": X})[0], plain_output(src / "model.onnx"))
