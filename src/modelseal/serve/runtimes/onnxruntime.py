"""ONNX models on ONNX Runtime (``platform: "onnxruntime_onnx"``, ``backend: "onnxruntime"``): the CUDA
provider when installed, else the CPU. A sealed model is decrypted into buffers this instance wipes as
soon as its session exists (:func:`modelseal.onnx.session_from_files`).

Data types: ``tensor(string)`` is ``BYTES`` (ONNX Runtime's Python API takes and returns text: elements
are decoded from and encoded to UTF-8 here; an input element that is not UTF-8 is a 400), and
``tensor(bfloat16)`` is ``BF16``, which its Python API cannot take or return as numpy arrays: inputs go
in as ``OrtValue`` objects holding the bits (``ortvalue_from_numpy_with_onnx_type``), outputs are bound to CPU
memory (IOBinding) and copied out as ``ml_dtypes.bfloat16``."""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError
from modelseal.serve import datatypes
from modelseal.serve.errors import bad_request
from modelseal.serve.repository import ConfigError, ModelSpec
from modelseal.serve.runtimes.base import Declared, RuntimeInfo, Signature
from modelseal.serve.runtimes.declared import check_tensors
from modelseal.serve.source import ModelSource

_ORT_TYPES = {f"tensor({n})": v2 for n, v2 in (
    ("bool", "BOOL"), ("uint8", "UINT8"), ("uint16", "UINT16"), ("uint32", "UINT32"), ("uint64", "UINT64"),
    ("int8", "INT8"), ("int16", "INT16"), ("int32", "INT32"), ("int64", "INT64"), ("float16", "FP16"),
    ("float", "FP32"), ("double", "FP64"), ("string", "BYTES"), ("bfloat16", "BF16"))}  # fmt: skip
_STRING, _BF16 = "tensor(string)", "tensor(bfloat16)"
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


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
        self.ort = ort
        self.types = {a.name: a.type for a in (*self.session.get_inputs(), *self.session.get_outputs())}

    def declared(self) -> Signature:
        return _ort_declared(self.session.get_inputs()), _ort_declared(self.session.get_outputs())

    def check(self, spec: ModelSpec) -> None:
        check_tensors(spec, "ONNX", *self.declared())
        strings = [a.name for a in self.session.get_inputs() if a.type == _STRING]
        bf16 = [t.name for t in spec.outputs if self.types.get(t.name) == _BF16]
        if strings and bf16:  # BF16 outputs need IOBinding, which takes no string inputs
            raise ConfigError(f"model {spec.name}: ONNX Runtime's Python API cannot return the BF16 output(s) "
                              f"{bf16} of a model with string inputs {strings}")  # fmt: skip

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feed = {n: self._feed(n, a) for n, a in inputs.items()}
        if not any(self.types.get(o) == _BF16 for o in outputs):
            results = [_from_ort(r) for r in self.session.run(outputs, feed)]
        else:
            binding = self.session.io_binding()
            for n, value in feed.items():
                if not isinstance(value, self.ort.OrtValue):
                    value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                binding.bind_ortvalue_input(n, value)
            for o in outputs:
                binding.bind_output(o, "cpu")
            self.session.run_with_iobinding(binding)
            results = [_from_ortvalue(v) for v in binding.get_outputs()]
        return dict(zip(outputs, results, strict=True))

    def _feed(self, name: str, array: np.ndarray) -> Any:
        kind = self.types.get(name)
        if kind == _STRING or array.dtype.kind in "OSU":
            return _ort_strings(name, array)
        if kind == _BF16 or array.dtype == datatypes.BF16:
            bits = np.ascontiguousarray(array).view(np.uint16)
            return self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _ONNX_BFLOAT16)
        return array

    def close(self) -> None:
        self.session = None  # the weights are ONNX Runtime's own copy: freed, not reachable to wipe


def _ort_strings(name: str, array: np.ndarray) -> np.ndarray:
    """A BYTES tensor as ONNX Runtime takes strings: an object array of str (it would turn a bytes element
    into the text ``"b'...'"``)."""
    out = np.empty(array.shape, dtype=object)
    try:
        out.reshape(-1)[:] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.ravel().tolist()]
    except UnicodeDecodeError:
        raise bad_request(f"input {name}: ONNX Runtime takes string tensors as text: "
                          "an element is not UTF-8") from None  # fmt: skip
    return out


def _from_ort(result: Any) -> np.ndarray:
    """An output in the server's form: string tensors (str objects) as object arrays of bytes."""
    array = np.asarray(result)
    if array.dtype.kind in "OU":
        out = np.empty(array.shape, dtype=object)
        out.reshape(-1)[:] = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.ravel().tolist()]
        return out
    return array


def _from_ortvalue(value: Any) -> np.ndarray:
    """A CPU OrtValue as a numpy array; bfloat16 (which ``OrtValue.numpy`` refuses) copied bit for bit."""
    if value.data_type() != _BF16:
        return _from_ort(value.numpy())
    shape = tuple(value.shape())
    count = math.prod(shape)
    bits = np.empty(count, dtype=np.uint16)
    if count:
        ctypes.memmove(bits.ctypes.data, value.data_ptr(), count * 2)
    return bits.view(datatypes.numpy_dtype("BF16")).reshape(shape)


RUNTIME = RuntimeInfo("onnxruntime_onnx", OnnxRuntime, ("model.onnx.sealed", "model.onnx"), backend="onnxruntime")
