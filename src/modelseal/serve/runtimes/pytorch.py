"""PyTorch models (``platform: "pytorch_libtorch"``, ``backend: "pytorch"``): a TorchScript archive
(``model.pt``), or a state dict (``model.safetensors``) loaded into the module that the config's
``parameters { key: "entry_point" value: { string_value: "module:factory" } }`` builds; ``module`` is
imported with the model's directory on ``sys.path`` (so a ``model.py`` there works). On ``cuda`` when
PyTorch sees a GPU. Unloading zeroes every parameter and buffer of the module: they are the decrypted
weights, and PyTorch would only free them."""

from __future__ import annotations

from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.serve.repository import ModelSpec
from modelseal.serve.runtimes.base import RuntimeInfo
from modelseal.serve.runtimes.declared import check_arity
from modelseal.serve.source import ModelSource


class TorchRuntime:
    def __init__(self, spec: ModelSpec, source: ModelSource, threads: int) -> None:
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("PyTorch models need PyTorch: pip install 'modelseal[torch]'") from None
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        artifact = source.path
        if ".safetensors" in artifact.name:
            self.module = build_module(spec)
            if source.sealed:
                from modelseal.torch import load_model_from

                load_model_from(self.module, source.safetensors(), device=self.device)
            else:
                from safetensors.torch import load_file

                self.module.load_state_dict(load_file(str(artifact), device=self.device), assign=True)
        elif source.sealed:
            from modelseal.crypto.keys import wipe
            from modelseal.torch import jit_load_buffer

            files = source.files()
            try:
                if len(files) != 1:
                    raise UsageError(f"{artifact} must hold one TorchScript archive, found {len(files)} files")
                self.module = jit_load_buffer(*files.values(), map_location=self.device, source=str(artifact))
            finally:
                for buffer in files.values():
                    wipe(buffer)
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
        module, self.module = self.module, None
        if module is not None:
            with self.torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.zero_()


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


RUNTIME = RuntimeInfo(
    "pytorch_libtorch",
    TorchRuntime,
    ("model.pt.sealed", "model.pt", "model.safetensors.sealed", "model.safetensors"),
    backend="pytorch",
)
