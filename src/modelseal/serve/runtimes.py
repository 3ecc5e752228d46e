"""Runtimes: one model instance in memory, loaded from a sealed (or plain) artifact, run on numpy arrays.

Sealed artifacts are decrypted into memory only (``modelseal.onnx``, ``modelseal.torch``); a plain
artifact is loaded the framework's usual way, which is what the benchmarks compare against. The GPU is
used when present: ONNX Runtime's CUDA provider if installed, PyTorch's ``cuda`` device.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.recipients.registry import IdentitySpec
from modelseal.serve import datatypes
from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec, is_sealed

# what a model itself says about one tensor: (V2 datatype, or the framework's own name for a type the
# protocol lacks, or None when unknown; the full shape with None for a variable dim, or None when unknown)
Declared = tuple[str | None, tuple[int | None, ...] | None]


class Runtime(Protocol):
    device: str

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...

    def check(self, spec: ModelSpec) -> None: ...

    def close(self) -> None: ...


# --- the config checked against the model (at load, so a mismatch is a clear UNAVAILABLE reason) ------


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return str([-1 if d is None else d for d in shape])


def _shape_problem(what: str, t: TensorSpec, shape: tuple[int | None, ...], batching: bool) -> str | None:
    config = [-1, *t.dims] if batching else list(t.dims)
    if batching and shape and shape[0] is not None:
        return (f"{what} {t.name!r} has a fixed batch dimension {shape[0]} in the model ({_shape_text(shape)}), "
                "but max_batch_size > 0 batches it: set max_batch_size: 0 and declare the full dims")  # fmt: skip
    if len(shape) != len(config) or any(
        c != -1 and m is not None and c != m for c, m in zip(config[1:] if batching else config,
                                                                shape[1:] if batching else shape, strict=False)
    ):  # fmt: skip
        return f"{what} {t.name!r} has shape {config} in the config but {_shape_text(shape)} in the model"
    return None


def check_tensors(spec: ModelSpec, kind: str, inputs: dict[str, Declared] | None,
                  outputs: dict[str, Declared] | None) -> None:  # fmt: skip
    """Raise :class:`ConfigError` naming every way the config's inputs/outputs disagree with what the
    ``kind`` model declares (``None``: the framework cannot tell). The config must name every model input
    (all are fed) and may name a subset of its outputs."""
    problems = []
    checks = (("input", spec.inputs, inputs, True), ("output", spec.outputs, outputs, False))
    for what, declared, model, exact in checks:
        if model is None:
            continue
        names = [t.name for t in declared]
        unknown = [n for n in names if n not in model]
        if unknown:
            problems.append(f"config {what}(s) {unknown} are not in the model (its {what}s: {sorted(model)})")
        missing = [n for n in model if n not in names] if exact else []
        if missing:
            problems.append(f"the model also needs {what}(s) {missing}, which the config does not declare")
        for t in declared:
            dtype, shape = model.get(t.name, (None, None))
            if dtype is not None and dtype != t.datatype:
                problems.append(f"{what} {t.name!r} is {t.datatype} in the config but {dtype} in the model")
            problem = _shape_problem(what, t, shape, spec.batching) if shape is not None else None
            if problem:
                problems.append(problem)
    if problems:
        raise ConfigError(f"model {spec.name}: its config disagrees with the {kind} model: {'; '.join(problems)}")


def _forward_parameters(function: Any) -> tuple[list[str], int] | None:
    """(positional parameter names, how many are required) of a module's ``forward``: from the TorchScript
    schema, else the Python signature; None when it takes ``*args`` or cannot be told."""
    schema = getattr(function, "schema", None)
    if schema is not None:  # a ScriptMethod: inspect cannot see it
        args = [a for a in schema.arguments if a.name != "self" and not a.kwarg_only]
        return [a.name for a in args], sum(not a.has_default_value() for a in args)
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in positional], sum(p.default is p.empty for p in positional)


def check_arity(spec: ModelSpec, kind: str, function: Any) -> None:
    """A PyTorch model is called with the config's inputs as positional arguments, in order: their number
    must be one the model's ``forward`` accepts (names and dtypes are not knowable before a call)."""
    found = _forward_parameters(function)
    if found is None:
        return
    names, required = found
    if not required <= len(spec.inputs) <= len(names):
        raise ConfigError(f"model {spec.name}: its config declares {len(spec.inputs)} input(s) "
                          f"{[t.name for t in spec.inputs]}, but the {kind} model's forward takes {names}")  # fmt: skip


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
    def __init__(
        self, spec: ModelSpec, artifact: Path, identity: IdentitySpec | None, threads: int, signers: list[str]
    ) -> None:
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
        if is_sealed(artifact):
            from modelseal.onnx import InferenceSession

            self.session = InferenceSession(
                artifact, identity=identity, sess_options=options, providers=providers, trusted_signers=signers or None
            )
        else:
            self.session = ort.InferenceSession(str(artifact), sess_options=options, providers=providers)

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        results = self.session.run(outputs, inputs)
        return dict(zip(outputs, results, strict=True))

    def check(self, spec: ModelSpec) -> None:
        check_tensors(spec, "ONNX", _ort_declared(self.session.get_inputs()), _ort_declared(self.session.get_outputs()))

    def close(self) -> None:
        self.session = None


class TorchRuntime:
    """PyTorch: a TorchScript archive (``model.pt``), or a state dict (``model.safetensors``) loaded into the
    module that the config's ``parameters { key: "entry_point" value: { string_value: "module:factory" } }``
    builds; ``module`` is imported with the model's directory on ``sys.path`` (so a ``model.py`` there works)."""

    def __init__(
        self, spec: ModelSpec, artifact: Path, identity: IdentitySpec | None, threads: int, signers: list[str]
    ) -> None:
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("PyTorch models need PyTorch: pip install 'modelseal[torch]'") from None
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        sealed = is_sealed(artifact)
        if ".safetensors" in artifact.name:
            self.module = build_module(spec)
            if sealed:
                from modelseal.torch import load_model

                load_model(
                    self.module, artifact, identity=identity, device=self.device, trusted_signers=signers or None
                )
            else:
                from safetensors.torch import load_file

                self.module.load_state_dict(load_file(str(artifact), device=self.device), assign=True)
        elif sealed:
            from modelseal.torch import load_torchscript

            self.module = load_torchscript(
                artifact, identity=identity, map_location=self.device, trusted_signers=signers or None
            )
        else:
            self.module = torch.jit.load(str(artifact), map_location=self.device)
        self.module.eval()
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]

    def check(self, spec: ModelSpec) -> None:
        check_arity(spec, "PyTorch", self.module.forward)

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(writable(inputs[n])).to(self.device) for n in self.input_names]
            result = self.module(*args)
        values = [result] if isinstance(result, torch.Tensor) else list(result)
        if len(values) != len(self.output_names):
            raise UsageError(f"the model returned {len(values)} outputs, its config declares {len(self.output_names)}")
        by_name = dict(zip(self.output_names, values, strict=True))
        return {n: by_name[n].detach().cpu().numpy() for n in outputs}

    def close(self) -> None:
        self.module = None


def writable(array: np.ndarray) -> np.ndarray:
    """Request tensors are read-only views of the request body; PyTorch needs memory it may write."""
    return array if array.flags.writeable and array.flags.c_contiguous else np.array(array, order="C")


def build_module(spec: ModelSpec) -> Any:
    """The untrained module a state dict is loaded into, from the config's ``entry_point``."""
    import importlib
    import sys

    entry = spec.parameters.get("entry_point", "")
    module_name, _, attr = entry.partition(":")
    if not module_name or not attr:
        raise UsageError(f'model {spec.name}: a state dict needs parameters entry_point = "module:factory"')
    if str(spec.path) not in sys.path:
        sys.path.insert(0, str(spec.path))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"model {spec.name}: cannot import entry point {entry}: {exc}") from None
    return factory()


class TensorflowRuntime:
    """A TensorFlow SavedModel. Sealed, its files are decrypted into TensorFlow's in-memory ``ram://``
    filesystem, loaded from there, and removed from it right after (our buffers are wiped): the SavedModel
    never exists on a disk. ``parameters { key: "signature" ... }`` picks the signature (serving_default)."""

    def __init__(
        self, spec: ModelSpec, artifact: Path, identity: IdentitySpec | None, threads: int, signers: list[str]
    ) -> None:
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import tensorflow as tf
        except ImportError:
            raise MissingDependencyError("SavedModels need TensorFlow: pip install 'modelseal[tensorflow]'") from None
        self.tf = tf
        self.device = "cuda" if tf.config.list_physical_devices("GPU") else "cpu"
        if is_sealed(artifact):
            self.model = load_saved_model_from_memory(tf, artifact, identity, signers)
        else:
            self.model = tf.saved_model.load(str(artifact))
        name = spec.parameters.get("signature", "serving_default")
        if name not in self.model.signatures:
            raise UsageError(f"model {spec.name} has no signature {name!r} (has {sorted(self.model.signatures)})")
        self.fn = self.model.signatures[name]

    def check(self, spec: ModelSpec) -> None:
        def declared(specs: Any) -> dict[str, Declared]:
            found: dict[str, Declared] = {}
            for key, s in specs.items():
                try:
                    dtype: str | None = datatypes.v2_name(s.dtype.as_numpy_dtype)
                except (UsageError, TypeError):
                    dtype = s.dtype.name
                dims = s.shape.as_list() if s.shape.rank is not None else None
                found[key] = (dtype, tuple(dims) if dims is not None else None)
            return found

        _, kwargs = self.fn.structured_input_signature
        outputs = self.fn.structured_outputs
        check_tensors(spec, "TensorFlow", declared(kwargs), declared(outputs) if isinstance(outputs, dict) else None)

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        result = self.fn(**{n: self.tf.constant(a) for n, a in inputs.items()})
        missing = [n for n in outputs if n not in result]
        if missing:
            raise UsageError(f"the signature returned {sorted(result)}, not {missing}")
        return {n: result[n].numpy() for n in outputs}

    def close(self) -> None:
        self.fn = self.model = None


def load_saved_model_from_memory(tf: Any, artifact: Path, identity: IdentitySpec | None, signers: list[str]) -> Any:
    import uuid

    from modelseal.crypto.keys import wipe
    from modelseal.load.bundles import read_all

    files = read_all(artifact, identity=identity, trusted_signers=signers or None)
    root = f"ram://modelseal-{uuid.uuid4().hex}/"
    try:
        graphs = [n for n in files if n == "saved_model.pb" or n.endswith("/saved_model.pb")]
        if len(graphs) != 1:
            raise UsageError(f"{artifact} must hold exactly one SavedModel (saved_model.pb), found {len(graphs)}")
        for name, data in files.items():
            target = root + name
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            with tf.io.gfile.GFile(target, "wb") as out:
                out.write(bytes(data))
        return tf.saved_model.load(root + graphs[0].removesuffix("saved_model.pb"))
    finally:
        if tf.io.gfile.exists(root):
            tf.io.gfile.rmtree(root)
        for data in files.values():
            wipe(data)


RUNTIMES: dict[str, type[OnnxRuntime] | type[TorchRuntime] | type[TensorflowRuntime]] = {
    "onnxruntime_onnx": OnnxRuntime,
    "pytorch_libtorch": TorchRuntime,
    "tensorflow_savedmodel": TensorflowRuntime,
}


def load_runtime(
    spec: ModelSpec, artifact: Path, identity: IdentitySpec | None, threads: int = 0, signers: list[str] | None = None
) -> Any:
    """One instance of ``spec``'s model from ``artifact`` (decrypted in memory when sealed; with ``signers``,
    only if a trusted publisher signed it), checked to agree with the config."""
    runtime = RUNTIMES[spec.platform](spec, artifact, identity, threads, signers or [])
    try:
        runtime.check(spec)
    except BaseException:
        runtime.close()
        raise
    return runtime
