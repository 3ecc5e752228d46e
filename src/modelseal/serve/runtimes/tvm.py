"""Compiled TVM models (``platform: "tvm"``, ``backend: "tvm"``): a Relax VM executable compiled for
``llvm`` plus its params, as :func:`modelseal.tvm.export` writes them (``model.so``,
``params.safetensors``, ``metadata.json``). Sealed, the params are decrypted straight into TVM arrays
this instance zeroes on close, and the compiled library is loaded from an anonymous memory file, never
a disk (:func:`modelseal.tvm.module_from_artifacts`). CPU only.

The model's names, datatypes and shapes come from its ``metadata.json`` (:meth:`TvmRuntime.declared`),
so a config may leave its inputs and outputs out. The config's ``instance_group`` count loads that many
copies of the library and params; ``--threads`` is not applied (TVM sizes one thread pool for the whole
process, from ``TVM_NUM_THREADS``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from modelseal.serve.errors import bad_request
from modelseal.serve.repository import ModelSpec
from modelseal.serve.runtimes.base import Declared, RuntimeInfo, Signature
from modelseal.serve.runtimes.declared import check_tensors
from modelseal.serve.source import ModelSource

if TYPE_CHECKING:
    from modelseal.tvm import Module, TensorInfo


def _declared(tensors: tuple[TensorInfo, ...]) -> dict[str, Declared]:
    return {t.name: (t.datatype, t.shape) for t in tensors}


class TvmRuntime:
    device = "cpu"

    def __init__(self, spec: ModelSpec, source: ModelSource, threads: int) -> None:
        # modelseal.tvm imports TVM only when a module is built (MissingDependencyError names the extra)
        from modelseal import tvm

        self.model: Module | None
        if source.sealed:
            # source.directory, not path.is_dir(): a pointer file naming a remote sealed directory is a file
            self.model = tvm.module_from_artifacts(source.artifacts, str(source.path), directory=source.directory)
        else:
            self.model = tvm.module_from_plain(source.path)

    def _module(self) -> Module:
        if self.model is None:
            from modelseal.errors import UsageError

            raise UsageError("the TVM model is closed")
        return self.model

    def declared(self) -> Signature:
        meta = self._module().metadata
        return _declared(meta.inputs), _declared(meta.outputs)

    def check(self, spec: ModelSpec) -> None:
        inputs, outputs = self.declared()
        check_tensors(spec, "TVM", inputs, outputs)

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        model = self._module()
        for t in model.metadata.inputs:  # a config may say -1 where the model is fixed: refused here as a
            given = inputs.get(t.name)  # bad request, not as TVM's error (a 500 and a traceback)
            if given is not None and (given.ndim != len(t.shape) or any(
                    d is not None and d != g for d, g in zip(t.shape, given.shape, strict=False))):  # fmt: skip
                fixed = [-1 if d is None else d for d in t.shape]
                raise bad_request(f"input {t.name} has shape {list(given.shape)}; the TVM model takes {fixed}")
        return model.run(inputs, outputs)

    def close(self) -> None:
        """Free the executable and zero every params array (and the memory file of the library)."""
        model, self.model = self.model, None
        if model is not None:
            model.close()


RUNTIME = RuntimeInfo("tvm", TvmRuntime, ("model.tvm.sealed", "model.tvm"), backend="tvm")
