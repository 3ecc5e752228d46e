"""A tiny real OpenVINO model (``relu(x @ W + b)``, input ``x`` of shape ``[n, 8]``, output ``y`` of shape
``[n, 4]``) written as an OpenVINO IR (``model.xml`` + ``model.bin``, by ``openvino.save_model``) or as an
ONNX file with the same weights, for tests/test_openvino.py, other tests and bench/serve.py.

Weights, bias and inputs are small integers, so every product and sum is exact in bfloat16 as well as
float32: the CPU plugin's default inference precision on CPUs with bf16 (AMX, AVX512-BF16) gives the very
same numbers as the numpy reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import modelseal.openvino  # noqa: F401 - first: keeps OpenVINO's telemetry from writing under ~/intel

INPUTS, OUTPUTS = 8, 4


@dataclass(frozen=True)
class Reference:
    """What the model must answer: ``outputs`` for ``inputs``, by tensor name."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.integers(-2, 3, size=(INPUTS, OUTPUTS)).astype(np.float32)
    b = rng.integers(-2, 3, size=(OUTPUTS,)).astype(np.float32)
    return w, b


def reference(batch: int = 3, seed: int = 0) -> Reference:
    """Inputs of ``batch`` rows and the outputs numpy computes for them."""
    w, b = weights(seed)
    x = np.random.default_rng(seed + 1).integers(-2, 3, size=(batch, INPUTS)).astype(np.float32)
    return Reference({"x": x}, {"y": np.maximum(x @ w + b, 0).astype(np.float32)})


def write_ir(directory: Path, seed: int = 0, name: str = "model") -> Reference:
    """``directory/{name}.xml`` and ``directory/{name}.bin`` (float32 weights), built with OpenVINO's opset
    API; returns the reference inputs/outputs."""
    import openvino as ov
    import openvino.opset13 as ops

    w, b = weights(seed)
    x = ops.parameter([-1, INPUTS], np.float32, name="x")
    y = ops.relu(ops.add(ops.matmul(x, ops.constant(w), False, False), ops.constant(b)))
    y.output(0).get_tensor().set_names({"y"})
    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([y], [x], "tiny"), directory / f"{name}.xml", compress_to_fp16=False)
    return reference(seed=seed)


def write_onnx(path: Path, seed: int = 0) -> Reference:
    """The same model as an ONNX file (weights inside it); returns the reference inputs/outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = weights(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", INPUTS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", OUTPUTS])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return reference(seed=seed)


CONFIG = """name: "{name}"
backend: "openvino"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {inputs} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {outputs} ] }} ]
"""


def config(name: str) -> str:
    """A config.pbtxt serving the model as ``name`` with Triton's OpenVINO backend name."""
    return CONFIG.format(name=name, inputs=INPUTS, outputs=OUTPUTS)
