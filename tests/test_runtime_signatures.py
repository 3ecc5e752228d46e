"""Each runtime's ``declared()`` (what the model itself says of its tensors) and its BYTES / BF16 round trips,
in process: ONNX Runtime (string and bfloat16 tensors), PyTorch (``example_inputs``, bfloat16) and TensorFlow
(tf.string, bfloat16; slow: the import takes seconds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec
from modelseal.serve.source import ModelSource

# Runtimes here are built with threads=0 (the framework's default): TorchRuntime's threads=N calls
# torch.set_num_threads(N) for the whole process, and an xdist worker that ran these with 1 later computed
# test_serve_e2e's expected TorchScript output on one thread, 1e-8 away from the server's two-thread answer.

BF16 = np.dtype(ml_dtypes.bfloat16)


def spec(platform: str, inputs: tuple[TensorSpec, ...] = (), outputs: tuple[TensorSpec, ...] = (),
         max_batch_size: int = 0, path: Path = Path("."), **parameters: str) -> ModelSpec:  # fmt: skip
    return ModelSpec(name="m", path=path, platform=platform, max_batch_size=max_batch_size, inputs=inputs,
                     outputs=outputs, parameters=parameters)  # fmt: skip


def byte_array(values: list[bytes], shape: Any) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


# --- ONNX Runtime -----------------------------------------------------------------------------------


def onnx_model(path: Path) -> Path:
    """Identity on a string tensor and on a bfloat16 one, with symbolic batch dims."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["text_out"]), helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"]),
         helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 3])],
        [helper.make_tensor_value_info("text_out", TensorProto.STRING, ["n"]),
         helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def test_onnx_declares_strings_and_bfloat16_and_runs_them(tmp_path: Path) -> None:
    from modelseal.serve.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime(spec("onnxruntime_onnx"), ModelSource(onnx_model(tmp_path / "m.onnx"), {}, False), 0)
    inputs, outputs = runtime.declared()
    assert inputs == {"text": ("BYTES", (None,)), "x": ("BF16", (None, 3))}
    assert outputs == {"text_out": ("BYTES", (None,)), "y": ("BF16", (None, 3))}
    full = spec("onnxruntime_onnx", (TensorSpec("text", "BYTES", (-1,)), TensorSpec("x", "BF16", (-1, 3))),
                (TensorSpec("text_out", "BYTES", (-1,)),))  # fmt: skip
    runtime.check(full)  # agrees
    with pytest.raises(ConfigError, match="input 'x' is FP32 in the config but BF16 in the model"):
        runtime.check(spec("onnxruntime_onnx", (TensorSpec("text", "BYTES", (-1,)), TensorSpec("x", "FP32", (-1, 3))),
                           full.outputs))  # fmt: skip
    with pytest.raises(ConfigError, match="cannot return the BF16 output"):  # string inputs + BF16 outputs
        runtime.check(spec("onnxruntime_onnx", full.inputs, (TensorSpec("y", "BF16", (-1, 3)),)))

    text = byte_array(["héllo".encode(), b""], [2])
    x = np.array([[1, 2, 3], [-1, 0, 0.5]], dtype=BF16)
    got = runtime.run({"text": text, "x": x}, ["text_out"])
    assert got["text_out"].dtype == object and got["text_out"].tolist() == text.tolist()
    empty = runtime.run({"text": byte_array([], [0]), "x": np.zeros((0, 3), BF16)}, ["text_out"])
    assert empty["text_out"].shape == (0,)
    runtime.close()


def test_onnx_bfloat16_outputs_come_back_as_ml_dtypes(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save

    from modelseal.serve.runtimes.onnxruntime import OnnxRuntime

    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["f", "f"], ["g"]),
             helper.make_node("Cast", ["g"], ["y"], to=TensorProto.BFLOAT16)]  # ONNX Runtime's CPU has no BF16 Add
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 3])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(tmp_path / "add.onnx"))
    runtime = OnnxRuntime(spec("onnxruntime_onnx"), ModelSource(tmp_path / "add.onnx", {}, False), 0)
    for x in (np.array([[1, 2.5, -3]], dtype=BF16), np.zeros((0, 3), BF16)):
        x.flags.writeable = False  # request tensors are read-only views of the body
        y = runtime.run({"x": x}, ["y"])["y"]
        assert y.dtype == BF16 and y.shape == x.shape and np.array_equal(y, x + x)


# --- PyTorch ------------------------------------------------------------------------------------------


def torch_module() -> Any:
    import torch

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))
            self.example_inputs = [torch.zeros(2, 3), torch.zeros(2, dtype=torch.bfloat16)]

        def forward(self, values: torch.Tensor, halves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return values * self.scale, (halves * 2).to(torch.bfloat16)

    return Two()


def torchscript(path: Path, module: Any) -> Path:
    import torch

    torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_torchscript_declares_forward_names_and_learns_outputs_from_example_inputs(tmp_path: Path) -> None:
    from modelseal.serve.runtimes.pytorch import _UNKNOWN, TorchRuntime

    artifact = torchscript(tmp_path / "m.pt", torch_module())
    runtime = TorchRuntime(spec("pytorch_libtorch"), ModelSource(artifact, {}, False), 0)
    assert runtime._outputs is _UNKNOWN  # nothing run yet: lazy
    inputs, outputs = runtime.declared()
    assert inputs == {"values": ("FP32", (2, 3)), "halves": ("BF16", (2,))}
    assert outputs == {"OUTPUT__0": ("FP32", (2, 3)), "OUTPUT__1": ("BF16", (2,))}

    # names are positional: a Triton-style config agrees; datatypes and ranks are checked
    config = spec("pytorch_libtorch",
                  (TensorSpec("INPUT__0", "FP32", (3,)), TensorSpec("INPUT__1", "BF16", ())),
                  (TensorSpec("OUTPUT__0", "FP32", (3,)), TensorSpec("OUTPUT__1", "BF16", ())),
                  max_batch_size=4)  # fmt: skip
    runtime.check(config)
    x, h = np.ones((2, 3), np.float32), np.array([1.5, -1], dtype=BF16)
    got = runtime.run({"INPUT__0": x, "INPUT__1": h}, ["OUTPUT__1", "OUTPUT__0"])
    assert got["OUTPUT__1"].dtype == BF16 and got["OUTPUT__1"].tolist() == [3.0, -2.0]
    assert np.array_equal(got["OUTPUT__0"], x)
    wrong = spec("pytorch_libtorch", (TensorSpec("a", "FP32", (3,)), TensorSpec("b", "FP16", ())),
                 config.outputs, max_batch_size=4)  # fmt: skip
    with pytest.raises(ConfigError, match="input 'b' is FP16 in the config but BF16 in the model"):
        runtime.check(wrong)
    with pytest.raises(ConfigError, match="declares 1 output"):
        runtime.check(spec("pytorch_libtorch", config.inputs, config.outputs[:1], max_batch_size=4))
    with pytest.raises(ConfigError, match="BYTES"):
        runtime.check(spec("pytorch_libtorch", (TensorSpec("a", "BYTES", (3,)),), config.outputs))
    runtime.close()


def test_torch_without_examples_knows_names_only_or_runs_a_full_config(tmp_path: Path) -> None:
    import torch

    from modelseal.serve.runtimes.pytorch import TorchRuntime

    module = torch.nn.Linear(3, 2)
    artifact = torchscript(tmp_path / "lin.pt", module)
    bare = TorchRuntime(spec("pytorch_libtorch"), ModelSource(artifact, {}, False), 0)
    assert bare.declared() == ({"input": (None, None)}, None)
    full = spec("pytorch_libtorch", (TensorSpec("x", "FP32", (3,)),), max_batch_size=8)
    runtime = TorchRuntime(full, ModelSource(artifact, {}, False), 0)
    assert runtime.declared() == ({"input": (None, None)}, {"OUTPUT__0": ("FP32", (None, None))})


def test_a_state_dict_takes_example_inputs_from_its_entry_point(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from modelseal.serve.runtimes.pytorch import TorchRuntime

    (tmp_path / "arch_examples.py").write_text(
        "import torch\n"
        "def build():\n    return torch.nn.Linear(4, 2)\n"
        "def example_inputs():\n    return (torch.zeros(1, 4, dtype=torch.float32),)\n"
    )
    save_file({"weight": __import__("torch").ones(2, 4), "bias": __import__("torch").zeros(2)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    try:
        runtime = TorchRuntime(spec("pytorch_libtorch", path=tmp_path, entry_point="arch_examples:build"),
                               ModelSource(tmp_path / "model.safetensors", {}, False), 0)  # fmt: skip
        assert runtime.declared() == ({"input": ("FP32", (1, 4))}, {"OUTPUT__0": ("FP32", (1, 2))})
    finally:
        sys.modules.pop("arch_examples", None)


def test_a_config_cannot_make_the_server_build_huge_examples(tmp_path: Path) -> None:
    """The second review: dims [12000, 12000] in a load request's config made 1.1 GB of zeros to run the
    model on, kept after the failure by the traceback; each such request grew the server by a gigabyte."""
    import torch

    from modelseal.serve.runtimes.pytorch import MAX_EXAMPLE_BYTES, TorchRuntime

    artifact = torchscript(tmp_path / "lin.pt", torch.nn.Linear(3, 2))
    huge = spec("pytorch_libtorch", (TensorSpec("x", "FP64", (12000, 12000)),))
    runtime = TorchRuntime(huge, ModelSource(artifact, {}, False), 0)
    with pytest.raises(ConfigError, match=f"example inputs to learn the outputs from; at most {MAX_EXAMPLE_BYTES}"):
        runtime.declared()
    float64 = spec("pytorch_libtorch", (TensorSpec("x", "FP64", (3,)),))
    wrong = TorchRuntime(float64, ModelSource(artifact, {}, False), 0)
    with pytest.raises(ConfigError, match="forward failed on its example inputs") as caught:
        wrong.declared()
    assert caught.value.__context__ is None and caught.value.__cause__ is None  # nothing keeps the zeros alive


def test_an_entry_point_file_is_loaded_by_path_and_never_put_on_sys_path(tmp_path: Path) -> None:
    """The second review: the model directory stayed on sys.path, so a yaml.py in it ran when the server
    next imported yaml, for every model."""
    from modelseal.serve.runtimes.pytorch import build_module

    (tmp_path / "model.py").write_text("import torch\ndef model():\n    return torch.nn.Linear(2, 2)\n")
    (tmp_path / "json.py").write_text("raise SystemExit('hijacked')\n")
    module = build_module(spec("pytorch_libtorch", path=tmp_path))
    assert type(module).__name__ == "Linear" and str(tmp_path) not in sys.path
    assert "model" not in sys.modules or getattr(sys.modules["model"], "__file__", "") != str(tmp_path / "model.py")


# --- TensorFlow -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorflow_declares_strings_and_bfloat16_and_runs_them(tmp_path: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .serving import compile_model_config

    compile_model_config()
    tf = pytest.importorskip("tensorflow")
    from modelseal.serve.runtimes.tensorflow import TensorflowRuntime

    class Strings(tf.Module):  # type: ignore[misc,name-defined]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text"),
                                      tf.TensorSpec([None, 2], tf.bfloat16, name="x")])  # fmt: skip
        def serve(self, text: Any, x: Any) -> dict[str, Any]:
            return {"upper": tf.strings.upper(text), "double": x * 2}

    model = Strings()
    tf.saved_model.save(model, str(tmp_path / "s.savedmodel"), signatures={"serving_default": model.serve})
    runtime = TensorflowRuntime(spec("tensorflow_savedmodel"), ModelSource(tmp_path / "s.savedmodel", {}, False), 0)
    inputs, outputs = runtime.declared()
    assert inputs == {"text": ("BYTES", (None,)), "x": ("BF16", (None, 2))}
    assert outputs == {"double": ("BF16", (None, 2)), "upper": ("BYTES", (None,))}
    got = runtime.run({"text": byte_array([b"ab\xff", b""], [2]), "x": np.array([[1, -2.5]], BF16)},
                      ["upper", "double"])  # fmt: skip
    assert got["upper"].dtype == object and got["upper"].tolist() == [b"AB\xff", b""]
    assert got["double"].dtype == BF16 and got["double"].tolist() == [[2.0, -5.0]]
    runtime.close()
