"""ONNX models on ONNX Runtime (``platform: "onnxruntime_onnx"``, ``backend: "onnxruntime"``): the CUDA
provider when installed, else the CPU. A sealed model is decrypted into buffers this instance wipes as
soon as its session exists (:func:`modelseal.onnx.session_from_files`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError
from modelseal.serve.repository import ModelSpec
from modelseal.serve.runtimes.base import Declared, RuntimeInfo
from modelseal.serve.runtimes.declared import check_tensors
from modelseal.serve.source import ModelSource

_ORT_TYPES = {f"tensor({n})": v2 for n, v2 in (
    ("bool", "BOOL"), ("uint8", "UINT8"), ("uint16", "UINT16"), ("uint32", "UINT32"), ("uint64", "UINT64"),
    ("int8", "INT8"), ("int16", "INT16"), ("int32", "INT32"), ("int64", "INT64"), ("float16", "FP16"),
    ("float", "FP32"), ("double", "FP64"))}  # fmt: skip


def _ort_declared(args: Any) -> dict[str, Declared]:
    """ONNX Runtime's NodeArgs: symbolic or unknown dims (strings, None) are variable."""
    found: dict[str, Declared] = {}
    for a in args:
        shape = None if a.shape is None else tuple(d if isinstance(d, int) and d >= 0 else None for d in a.shape)
        found[a.name] = (_ORT_TYPES.get(a.type, a.type), shape)
    return found


class OnnxRuntime:
    def __init__(self, spec: ModelSpec, source: ModelSource, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("ONNX models need ONNX Runtime: pip install 'modelseal[onnx]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        if source.sealed:
            from modelseal.crypto.keys import wipe
            from modelseal.onnx import session_from_files

            files = source.files()
            try:
                self.session = session_from_files(files, str(source.path), sess_options=options, providers=providers)
            finally:
                for data in files.values():
                    wipe(data)
        else:
            self.session = ort.InferenceSession(str(source.path), sess_options=options, providers=providers)

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        results = self.session.run(outputs, inputs)
        return dict(zip(outputs, results, strict=True))

    def check(self, spec: ModelSpec) -> None:
        check_tensors(spec, "ONNX", _ort_declared(self.session.get_inputs()), _ort_declared(self.session.get_outputs()))

    def close(self) -> None:
        self.session = None  # the weights are ONNX Runtime's own copy: freed, not reachable to wipe


RUNTIME = RuntimeInfo("onnxruntime_onnx", OnnxRuntime, ("model.onnx.sealed", "model.onnx"), backend="onnxruntime")
