"""OpenVINO models (``backend: "openvino"``, as Triton's OpenVINO backend names it; ``platform:
"openvino"`` also works), compiled for the CPU from memory (:mod:`modelseal.openvino`).

A version directory holds, looked for in this order:

* ``model.xml.sealed``: the IR sealed as a directory (``modelseal seal ir/ -o 1/model.xml.sealed``,
  where ``ir/`` holds ``model.xml`` and ``model.bin``), or a bundle of that directory;
* ``model.onnx.sealed``: an ONNX model (weights inside the ``.onnx``) sealed as a bundle;
* ``model.xml`` with ``model.bin`` beside it (Triton's layout), or a plain ``model.onnx``.

``default_model_filename`` picks another name. Config ``parameters`` named after the OpenVINO properties
in :data:`PROPERTIES` (as Triton's backend takes them: ``PERFORMANCE_HINT``, ``NUM_STREAMS``...) are
passed to the compiler; ``--threads`` sets ``INFERENCE_NUM_THREADS``. On unload the tensor holding a
sealed IR's weights is zeroed (OpenVINO's own copies of them are freed, not wiped: see
:mod:`modelseal.openvino`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.serve.repository import ConfigError, ModelSpec
from modelseal.serve.runtimes.base import Declared, RuntimeInfo, Signature
from modelseal.serve.runtimes.declared import check_tensors
from modelseal.serve.source import ModelSource

# OpenVINO element type names -> V2 datatypes; other types (u4, nf4, f8e4m3...) keep OpenVINO's name
_V2 = {
    "boolean": "BOOL", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64", "i8": "INT8",
    "i16": "INT16", "i32": "INT32", "i64": "INT64", "f16": "FP16", "bf16": "BF16", "f32": "FP32", "f64": "FP64",
    "string": "BYTES",
}  # fmt: skip
# compile properties a config's parameters may set (Triton's OpenVINO backend takes these as parameters)
PROPERTIES = (
    "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT", "PERFORMANCE_HINT_NUM_REQUESTS",
    "INFERENCE_PRECISION_HINT", "EXECUTION_MODE_HINT", "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING",
    "SCHEDULING_CORE_TYPE",
)  # fmt: skip


class InvalidArgument(UsageError):  # noqa: N818 - the name serve.infer.runtime_refusal answers 400 for
    """A request tensor whose shape the model cannot take although the config allows it (a config dim of
    -1 where the model's is fixed): the client's error, a 400, as ONNX Runtime's ``InvalidArgument`` is."""


class OpenVinoRuntime:
    def __init__(self, spec: ModelSpec, source: ModelSource, threads: int) -> None:
        try:
            import modelseal.openvino as msov  # before openvino: keeps its telemetry off

            msov.openvino()
        except MissingDependencyError:
            raise MissingDependencyError("OpenVINO models need OpenVINO: pip install 'modelseal[openvino]'") from None
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        config.update((k, v) for k, v in spec.parameters.items() if k in PROPERTIES)
        self.device = "cpu"
        self._weights: Any = None
        self.compiled: Any = None
        self.request: Any = None
        if source.sealed:
            from modelseal.crypto.keys import wipe

            files = source.files()
            try:
                model, self._weights = msov.model_from_files(files, str(source.path))
            finally:
                for data in files.values():
                    wipe(data)
        else:
            model = msov.read_plain(source.path)
        try:  # OpenVINO holds the weights now: a failure zeroes them (build() never gets this object)
            self.compiled = msov.compile_loaded(model, "CPU", config, str(source.path))
            del model
            self.request = self.compiled.create_infer_request()
            self._inputs = _ports(self.compiled.inputs, "input", spec)
            self._outputs = _ports(self.compiled.outputs, "output", spec)
        except BaseException:
            self.close()
            raise

    def declared(self) -> Signature:
        return ({n: d for n, (_, d) in self._inputs.items()}, {n: d for n, (_, d) in self._outputs.items()})

    def check(self, spec: ModelSpec) -> None:
        check_tensors(spec, "OpenVINO", *self.declared())

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        for name, array in inputs.items():
            shape = self._inputs[name][1][1] if name in self._inputs else None
            if shape is not None and (len(shape) != array.ndim or any(
                    d is not None and d != n for d, n in zip(shape, array.shape, strict=True))):  # fmt: skip
                raise InvalidArgument(f"input {name!r} has shape {list(array.shape)}, the model takes "
                                      f"{[-1 if d is None else d for d in shape]}")  # fmt: skip
        result = self.request.infer(inputs)  # copies the inputs in and the outputs out
        return {name: result[self._outputs[name][0]] for name in outputs}

    def close(self) -> None:
        """Drop the compiled model, then zero the weights tensor its constants pointed into (a sealed
        IR's); what OpenVINO copied while compiling is freed, not wiped."""
        self.request = self.compiled = None
        weights, self._weights = self._weights, None
        if weights is not None:
            weights.data.fill(0)


def _ports(ports: Any, what: str, spec: ModelSpec) -> dict[str, tuple[Any, Declared]]:
    """{tensor name: (port, (V2 datatype, full shape with None for a dynamic dim))}, in the model's order.
    A port is found by its ``get_any_name()``, the name metadata and requests use."""
    found: dict[str, tuple[Any, Declared]] = {}
    for index, port in enumerate(ports):
        if not port.get_names():
            raise ConfigError(f"model {spec.name}: {what} {index} of the OpenVINO model has no tensor name")
        kind = port.get_element_type().get_type_name()
        partial = port.get_partial_shape()
        shape = None if partial.rank.is_dynamic else tuple(d.get_length() if d.is_static else None for d in partial)
        found[port.get_any_name()] = (port, (_V2.get(kind, kind), shape))
    return found


RUNTIME = RuntimeInfo(
    "openvino",
    OpenVinoRuntime,
    ("model.xml.sealed", "model.onnx.sealed", "model.xml", "model.onnx"),
    backend="openvino",
)
