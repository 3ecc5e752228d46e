"""A tiny real TVM model (Relax: matmul + bias + relu, params passed after the input), compiled for
llvm and exported with :func:`modelseal.tvm.export`, for the TVM tests and ``bench/serve.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEATURES, CLASSES = 4, 3
CONFIG = """name: "{name}"
platform: "tvm"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {features} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
"""


@dataclass(frozen=True)
class TinyTvm:
    """The export directory, the plain TVM reference (``reference(x) -> y``, run in this process with
    TVM's own VM), its params and an input batch."""

    export_dir: Path
    reference: Callable[[np.ndarray], np.ndarray]
    params: dict[str, np.ndarray]
    batch: np.ndarray


def _module() -> Any:
    """main(x[n, 4], w[4, 3], b[3]) = relu(x @ w + b), built with Relax's BlockBuilder."""
    import tvm.tirx
    from tvm import relax
    from tvm.script import relax as R  # noqa: N812 - TVMScript's own name

    x = relax.Var("x", R.Tensor((tvm.tirx.Var("n", "int64"), FEATURES), "float32"))
    w = relax.Var("w", R.Tensor((FEATURES, CLASSES), "float32"))
    b = relax.Var("b", R.Tensor((CLASSES,), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x, w, b]):
        with builder.dataflow():
            y = builder.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w), b)))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    return builder.get()


def build_tiny(out_dir: Path, seed: int = 0) -> TinyTvm:
    """Compile the tiny model for llvm, export it to ``out_dir`` (which must not exist) and return it
    with a plain-TVM reference function."""
    import tvm
    from tvm import relax

    import modelseal.tvm

    rng = np.random.default_rng(seed)
    params = {
        "w": rng.standard_normal((FEATURES, CLASSES)).astype(np.float32),
        "b": rng.standard_normal(CLASSES).astype(np.float32),
    }
    executable = tvm.compile(_module(), target="llvm")
    modelseal.tvm.export(
        executable, params, out_dir,
        inputs={"x": ("FP32", [-1, FEATURES])}, outputs={"y": ("FP32", [-1, CLASSES])},
    )  # fmt: skip
    vm = relax.VirtualMachine(executable, tvm.cpu())
    weights = [tvm.runtime.tensor(params["w"]), tvm.runtime.tensor(params["b"])]

    def reference(x: np.ndarray) -> np.ndarray:
        return vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, np.float32)), *weights).numpy()  # type: ignore[no-any-return]

    batch = rng.standard_normal((5, FEATURES)).astype(np.float32)
    return TinyTvm(Path(out_dir), reference, params, batch)


def add_tvm_model(repo: Path, name: str, artifact: Path, file_name: str = "model.tvm.sealed") -> Path:
    """REPO/NAME/config.pbtxt + REPO/NAME/1/FILE_NAME, a copy of ``artifact`` (a sealed bundle, a sealed
    directory or a plain export directory)."""
    import shutil

    version = repo / name / "1"
    version.mkdir(parents=True)
    target = version / file_name
    if artifact.is_dir():
        shutil.copytree(artifact, target)
    else:
        shutil.copyfile(artifact, target)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, features=FEATURES, classes=CLASSES))
    return target
