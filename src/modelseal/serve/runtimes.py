"""Runtimes: one model instance in memory, loaded from a sealed (or plain) artifact, run on numpy arrays.

Sealed artifacts are decrypted into memory only (``modelseal.onnx``, ``modelseal.torch``); a plain
artifact is loaded the framework's usual way, which is what the benchmarks compare against. The GPU is
used when present: ONNX Runtime's CUDA provider if installed, PyTorch's ``cuda`` device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.recipients.parse import IdentitySpec
from modelseal.serve.repository import ModelSpec, is_sealed


class Runtime(Protocol):
    device: str

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


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

    from modelseal.bundles import read_all
    from modelseal.crypto.keys import wipe

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
    only if a trusted publisher signed it)."""
    return RUNTIMES[spec.platform](spec, artifact, identity, threads, signers or [])
