"""TensorFlow SavedModels (``platform: "tensorflow_savedmodel"``, ``backend: "tensorflow"``). Sealed, the
SavedModel is loaded from memory (:func:`modelseal.tensorflow.saved_model_from_files`): it never exists
on a disk. ``parameters { key: "signature" ... }`` picks the signature (``serving_default``).
``tf.string`` tensors are ``BYTES`` (object arrays of bytes both ways) and ``tf.bfloat16`` is ``BF16``
(TensorFlow's numpy bfloat16 is ``ml_dtypes.bfloat16``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.serve import datatypes
from modelseal.serve.repository import ModelSpec
from modelseal.serve.runtimes.base import Declared, RuntimeInfo, Signature
from modelseal.serve.runtimes.declared import check_tensors
from modelseal.serve.source import ModelSource


class TensorflowRuntime:
    def __init__(self, spec: ModelSpec, source: ModelSource, threads: int) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import tensorflow as tf
        except ImportError:
            raise MissingDependencyError("SavedModels need TensorFlow: pip install 'modelseal[tensorflow]'") from None
        self.tf = tf
        self.device = "cuda" if tf.config.list_physical_devices("GPU") else "cpu"
        if source.sealed:
            from modelseal.crypto.keys import wipe
            from modelseal.tensorflow import saved_model_from_files

            files = source.files()
            try:
                self.model = saved_model_from_files(files, str(source.path))
            finally:
                for data in files.values():
                    wipe(data)
        else:
            self.model = tf.saved_model.load(str(source.path))
        try:  # TensorFlow holds the weights now: a refusal zeroes them first (build() never gets this object)
            name = spec.parameters.get("signature", "serving_default")
            if name not in self.model.signatures:
                raise UsageError(f"model {spec.name} has no signature {name!r} (has {sorted(self.model.signatures)})")
            self.fn = self.model.signatures[name]
        except BaseException:
            self.close()
            raise

    def declared(self) -> Signature:
        """The signature's keyword inputs and its outputs (None when it returns no dict of tensors)."""
        _, kwargs = self.fn.structured_input_signature
        outputs = self.fn.structured_outputs
        return _tf_declared(kwargs), _tf_declared(outputs) if isinstance(outputs, dict) else None

    def check(self, spec: ModelSpec) -> None:
        check_tensors(spec, "TensorFlow", *self.declared())

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        result = self.fn(**{n: self.tf.constant(a) for n, a in inputs.items()})
        missing = [n for n in outputs if n not in result]
        if missing:
            raise UsageError(f"the signature returned {sorted(result)}, not {missing}")
        return {n: _from_tf(result[n].numpy()) for n in outputs}

    def close(self) -> None:
        """Zero the weights (every variable the signatures use), then drop the model: TensorFlow would
        only free them. A loaded SavedModel lists its variables on each signature, not always on itself."""
        model, self.fn, self.model = self.model, None, None
        if model is None:
            return
        variables = {id(v): v for f in model.signatures.values() for v in f.variables}
        variables.update((id(v), v) for v in getattr(model, "variables", None) or ())
        for variable in variables.values():
            variable.assign(self.tf.zeros_like(variable))


_TF_TYPES = {"string": "BYTES", "bfloat16": "BF16"}


def _tf_declared(specs: Any) -> dict[str, Declared]:
    found: dict[str, Declared] = {}
    for key, s in specs.items():
        dtype: str | None = _TF_TYPES.get(s.dtype.name)
        if dtype is None:
            try:
                dtype = datatypes.v2_name(s.dtype.as_numpy_dtype)
            except (UsageError, TypeError):
                dtype = s.dtype.name
        dims = s.shape.as_list() if s.shape.rank is not None else None
        found[key] = (dtype, tuple(dims) if dims is not None else None)
    return found


def _from_tf(value: Any) -> np.ndarray:
    """A signature's output in the server's form: a string scalar comes back from ``.numpy()`` as bare
    ``bytes``; string tensors are object arrays of bytes already."""
    if isinstance(value, bytes):
        out = np.empty((), dtype=object)
        out[()] = value
        return out
    return np.asarray(value)


RUNTIME = RuntimeInfo(
    "tensorflow_savedmodel",
    TensorflowRuntime,
    ("model.savedmodel.sealed", "model.savedmodel"),
    backend="tensorflow",
)
