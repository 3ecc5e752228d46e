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


def external(name: str, location: str, size: int = 40) -> TensorProto:
    """A UINT8 tensor whose data ONNX Runtime would read from the file ``location``."""
    tensor = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[size], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)
    return tensor


PLACES = ("constant", "subgraph", "sparse", "initializer", "duplicate")


def hostile_model(place: str, location: str) -> onnx.ModelProto:
    """A model with one external tensor in ``place``: a Constant node's value, an If branch's initializer,
    a sparse initializer's values, or a main-graph initializer."""
    out = [helper.make_tensor_value_info("out", TensorProto.UINT8, [40])]
    inputs, inits, sparse = [], [], []
    if place == "constant":
        nodes = [helper.make_node("Constant", [], ["out"], value=external("c", location))]
    elif place == "subgraph":
        branch = helper.make_graph([], "branch", [], out, [external("out", location)])
        nodes = [helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)]
        inputs = [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    elif place == "sparse":
        indices = numpy_helper.from_array(np.arange(40, dtype=np.int64), "i")
        sparse = [helper.make_sparse_tensor(external("s", location), indices, [40])]
        nodes = [helper.make_node("Identity", ["s"], ["out"])]
    else:  # a main-graph initializer (twice, with one name: ONNX Runtime hands over one of them from memory)
        inits = [external("w", location)] * (2 if place == "duplicate" else 1)
        nodes = [helper.make_node("Identity", ["w"], ["out"])]
    graph = helper.make_graph(nodes, "g", inputs, out, inits, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


CONSTANT = "tensor 'c' (graph.node[0].attribute[0].t)"
OUTSIDE = "keeps its data outside the model"


@pytest.mark.parametrize(
    ("place", "location", "error"),
    [
        ("constant", "../x", f"{CONSTANT} {OUTSIDE} ('../x')"),
        ("constant", "/etc/hostname", f"{CONSTANT} {OUTSIDE} ('/etc/hostname')"),
        ("constant", "3", f"{CONSTANT} {OUTSIDE} ('3')"),
        ("subgraph", "weights.bin", f"tensor 'out' (graph.node[0].attribute[0].g.initializer[0]) {OUTSIDE}"),
        ("sparse", "3", f"tensor 's' (graph.sparse_initializer[0].values) {OUTSIDE} ('3')"),
        ("initializer", "../x", "external data of tensor 'w' (graph.initializer[0]): unsafe path '../x'"),
        ("initializer", "/proc/self/fd/3", "external data of tensor 'w' (graph.initializer[0]): unsafe path '/proc"),
        ("initializer", "3", "external data file '3' of 'w' is missing"),
        ("duplicate", "3", f"tensor 'w' (graph.initializer[0]) {OUTSIDE} ('3')"),
    ],
    ids=lambda value: value if value in PLACES or "/" in value or value.isdigit() else "",
)
def test_a_tensor_with_external_data_outside_the_sealed_files_is_refused(
    tmp_path: Path, host: HpkeIdentity, place: str, location: str, error: str
) -> None:
    """ONNX Runtime resolves external data against the model's directory, /proc/self/fd for our memory file:
    location '3' read whatever the server had open as descriptor 3 (onnxruntime 1.19: another model's
    decrypted memory file), and the scan looked only at the main graph's initializers."""
    onnx.save_model(hostile_model(place, location), tmp_path / "m.onnx")
    modelseal.seal(tmp_path / "m.onnx", tmp_path / "m.onnx.sealed", [host.recipient])
    with pytest.raises(modelseal.FormatError) as refused:
        modelseal.onnx.InferenceSession(tmp_path / "m.onnx.sealed", identity=host)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'm.onnx.sealed'}: {error}") and "\n" not in message
