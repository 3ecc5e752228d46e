"""PyTorch models (``platform: "pytorch_libtorch"``, ``backend: "pytorch"``): a TorchScript archive
(``model.pt``), or a state dict (``model.safetensors``) loaded into the module that the config's
``parameters { key: "entry_point" value: { string_value: "module:factory" } }`` builds (default: a
``model.py`` beside the config, ``model:model``); ``module`` is a file in the model's directory, loaded by
path and never put on ``sys.path``, or else an installed module. On ``cuda`` when
PyTorch sees a GPU. Unloading zeroes every parameter and buffer of the module: they are the decrypted
weights, and PyTorch would only free them.

What the model declares (:meth:`TorchRuntime.declared`): its inputs are ``forward``'s positional
parameters, by name; their datatypes and shapes, and its outputs (``OUTPUT__0``, ``OUTPUT__1``, ... as in
Triton, or the config's own output names, in order), are known only from **example inputs**: an
``example_inputs`` attribute of the module (a tensor, or a list or tuple of tensors, one per leading
``forward`` parameter; TorchScript keeps such an attribute when the module is scripted, not when traced),
or, for a state dict, an ``example_inputs()`` function next to the ``entry_point`` factory. The module is
run once on them (lazily: only when the outputs are asked for) to learn its outputs' count, datatypes and
ranks. Without examples, a config whose inputs have fixed dims is used to make zero inputs instead (output
dims then variable where the config's are). Tensors are positional both ways, so the config's i-th
input and output are checked against the model's i-th; an example's dims are an example, not a
constraint: only datatypes and ranks are checked. ``BF16`` travels as ``torch.bfloat16``; PyTorch takes no
``BYTES`` tensors."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError, one_line
from modelseal.serve import datatypes
from modelseal.serve.repository import ConfigError, ModelSpec
from modelseal.serve.runtimes.base import Declared, RuntimeInfo, Signature
from modelseal.serve.runtimes.declared import _forward_parameters, check_arity, check_tensors
from modelseal.serve.source import ModelSource

# torch dtype name -> V2 name (torch's unsigned 16/32/64-bit types exist from 2.3 on)
_V2_OF_TORCH = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "int8": "INT8",
    "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
    "bfloat16": "BF16",
}  # fmt: skip
_UNKNOWN: Any = object()  # not computed yet


MAX_EXAMPLE_BYTES = 64 << 20  # zeros built from a config's dims to run a model once and learn its outputs


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
        self.spec = spec  # its inputs and outputs may be empty: completed from declared() before check()
        self.entry: ModuleType | None = None  # a state dict's entry_point module (example_inputs() may be there)
        if ".safetensors" in artifact.name:
            self.module, self.entry = build_module(spec, with_entry=True)
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
        # the config's tensor names, in order (positional): set by check(), with the completed config
        self.input_names: list[str] | None = None
        self.output_names: list[str] | None = None
        self._examples: Any = _UNKNOWN
        self._outputs: Any = _UNKNOWN

    # --- what the model declares ------------------------------------------------------------------

    def example_inputs(self) -> list[Any] | None:
        """The model's example inputs (module attribute, else the entry point's function), on the device."""
        if self._examples is _UNKNOWN:
            found = getattr(self.module, "example_inputs", None)
            if found is None and self.entry is not None:
                found = getattr(self.entry, "example_inputs", None)
            if callable(found) and not isinstance(found, self.torch.Tensor):
                found = found()
            if isinstance(found, self.torch.Tensor):
                found = [found]
            if found is not None and (not isinstance(found, list | tuple) or
                                      not all(isinstance(t, self.torch.Tensor) for t in found)):  # fmt: skip
                raise ConfigError(f"model {self.spec.name}: example_inputs must be a tensor or a list or tuple of "
                                  f"tensors, not {type(found).__name__}")  # fmt: skip
            self._examples = None if found is None else [t.to(self.device) for t in found]
        return self._examples  # type: ignore[no-any-return]

    def _input_names(self) -> list[str] | None:
        found = _forward_parameters(self.module.forward)
        examples = self.example_inputs()
        if found is None:  # forward(*args): only examples tell how many
            return None if examples is None else [f"INPUT__{i}" for i in range(len(examples))]
        names = found[0]
        if examples is not None:
            if len(examples) > len(names):
                raise ConfigError(f"model {self.spec.name}: example_inputs holds {len(examples)} tensors, but "
                                  f"its forward takes {names}")  # fmt: skip
            names = names[: len(examples)]
        return names

    def _declared_inputs(self) -> dict[str, Declared] | None:
        names, examples = self._input_names(), self.example_inputs()
        if names is None:
            return None
        if examples is None:
            return {n: (None, None) for n in names}
        return {n: (_v2(t.dtype), tuple(t.shape)) for n, t in zip(names, examples, strict=True)}

    def _example_args(self) -> tuple[list[Any], bool] | None:
        """(arguments to run the module on, whether the inputs' dims are variable): the examples, else zeros
        shaped by a config that gives every input's dims (a batch of 1)."""
        examples = self.example_inputs()
        if examples is not None:
            return examples, False
        spec, torch = self.spec, self.torch
        if not spec.inputs or any(-1 in t.dims or t.datatype not in _V2_OF_TORCH.values() for t in spec.inputs):
            return None
        by_v2 = {v2: getattr(torch, name, None) for name, v2 in _V2_OF_TORCH.items()}
        if any(by_v2[t.datatype] is None for t in spec.inputs):
            return None
        shapes = [[1, *t.dims] if spec.batching else list(t.dims) for t in spec.inputs]
        size = sum(math.prod(shape) * torch.empty((), dtype=by_v2[t.datatype]).element_size()
                   for shape, t in zip(shapes, spec.inputs, strict=True))  # fmt: skip
        if size > MAX_EXAMPLE_BYTES:  # a config (or a load request's) asking for gigabytes of zeros
            raise ConfigError(f"model {spec.name}: the config's input dims make {size} bytes of example "
                              f"inputs to learn the outputs from; at most {MAX_EXAMPLE_BYTES}: declare the outputs")
        args = [torch.zeros(shape, dtype=by_v2[t.datatype], device=self.device)
                for shape, t in zip(shapes, spec.inputs, strict=True)]  # fmt: skip
        return args, spec.batching

    def _declared_outputs(self) -> dict[str, Declared] | None:
        """The outputs of one run on the example inputs (cached): None when there are none to run on, or
        when ``forward`` returns something other than a tensor or a tuple/list of tensors."""
        if self._outputs is _UNKNOWN:
            found = self._example_args()
            result = None
            if found is not None:
                args, variable = found
                torch = self.torch
                failure = None
                try:
                    with torch.inference_mode():
                        value = self.module(*args)
                except Exception as exc:
                    failure = f"{type(exc).__name__}: {one_line(exc)[:300]}"
                del args, found  # not kept alive by a traceback when the run failed
                if failure is not None:
                    raise ConfigError(f"model {self.spec.name}: forward failed on its example inputs: {failure}")
                values = [value] if isinstance(value, torch.Tensor) else value
                if isinstance(values, list | tuple) and all(isinstance(v, torch.Tensor) for v in values):
                    named = [t.name for t in self.spec.outputs]
                    result = {
                        named[i] if i < len(named) else f"OUTPUT__{i}":
                            (_v2(v.dtype), tuple(None for _ in v.shape) if variable else tuple(v.shape))
                        for i, v in enumerate(values)
                    }  # fmt: skip
            self._outputs = result
        return self._outputs  # type: ignore[no-any-return]

    def declared(self) -> Signature:
        """Inputs from ``forward``'s parameters (datatypes and shapes from the example inputs); outputs from
        one run on the example inputs (or on zeros shaped by a config with full input dims), else None."""
        return self._declared_inputs(), self._declared_outputs()

    def check(self, spec: ModelSpec) -> None:
        """The config's inputs must be a count ``forward`` accepts; against the example inputs (and the
        outputs, when they were learned: a complete config does not pay for an example run at load) their
        datatypes and ranks, position by position. PyTorch tensors are never BYTES."""
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        strings = [t.name for t in (*spec.inputs, *spec.outputs) if t.datatype == "BYTES"]
        if strings:
            raise ConfigError(f"model {spec.name}: PyTorch models take and return numeric tensors, but the config "
                              f"declares {strings} as BYTES")  # fmt: skip
        check_arity(spec, "PyTorch", self.module.forward)
        inputs = self._declared_inputs()
        outputs = self._outputs if self._outputs is not _UNKNOWN else None
        model_in = model_out = None
        if inputs is not None and self.example_inputs() is not None and len(inputs) == len(spec.inputs):
            model_in = _positional(spec.inputs, inputs)
        if outputs is not None:
            if len(outputs) != len(spec.outputs):
                raise ConfigError(f"model {spec.name}: its config declares {len(spec.outputs)} output(s) "
                                  f"{self.output_names}, but the PyTorch model returns {len(outputs)}")  # fmt: skip
            model_out = _positional(spec.outputs, outputs)
        check_tensors(spec, "PyTorch", model_in, model_out)

    # --- inference --------------------------------------------------------------------------------

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        torch = self.torch
        names = self.input_names if self.input_names is not None else list(inputs)
        with torch.inference_mode():
            args = [to_torch(torch, inputs[n]).to(self.device) for n in names]
            result = self.module(*args)
        values = [result] if isinstance(result, torch.Tensor) else list(result)
        output_names = self.output_names or [f"OUTPUT__{i}" for i in range(len(values))]
        if len(values) != len(output_names):
            raise UsageError(f"the model returned {len(values)} outputs, its config declares {len(output_names)}")
        by_name = dict(zip(output_names, values, strict=True))
        return {n: from_torch(torch, by_name[n]) for n in outputs}

    def close(self) -> None:
        module, self.module = self.module, None
        if module is not None:
            with self.torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.zero_()


def writable(array: np.ndarray) -> np.ndarray:
    """Request tensors are read-only views of the request body; PyTorch needs memory it may write."""
    return array if array.flags.writeable and array.flags.c_contiguous else np.array(array, order="C")


def to_torch(torch: Any, array: np.ndarray) -> Any:
    """A request tensor as a CPU torch tensor; BF16 (``ml_dtypes.bfloat16``, which torch cannot read)
    through its bits."""
    if array.dtype == datatypes.BF16:
        return torch.from_numpy(writable(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(writable(array))


def from_torch(torch: Any, tensor: Any) -> np.ndarray:
    """A result as a numpy array; bfloat16 as ``ml_dtypes.bfloat16`` through its bits."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(datatypes.BF16)  # type: ignore[no-any-return]
    return tensor.numpy()  # type: ignore[no-any-return]


def _v2(dtype: Any) -> str:
    """A torch dtype's V2 name, or torch's own name for a type the protocol lacks (complex64...)."""
    name = str(dtype).removeprefix("torch.")
    return _V2_OF_TORCH.get(name, name)


def _positional(config: Any, model: dict[str, Declared]) -> dict[str, Declared]:
    """The model's tensors under the config's names, position by position, dims relaxed to their rank (an
    example's dims are not the model's constraint)."""
    return {t.name: (dtype, None if shape is None else tuple(None for _ in shape))
            for t, (dtype, shape) in zip(config, model.values(), strict=False)}  # fmt: skip


DEFAULT_ENTRY_POINT = "model:model"  # a model.py beside config.pbtxt whose model() builds the module


def build_module(spec: ModelSpec, with_entry: bool = False) -> Any:
    """The untrained module a state dict is loaded into, from the config's ``entry_point`` (without one:
    ``model:model``, when the model's directory has a ``model.py``). A module file in the model's
    directory is loaded by path under a name of its own per model, so two models' ``model.py`` never
    collide in ``sys.modules``, and the directory is never put on ``sys.path`` (where a ``yaml.py`` in it
    would replace the server's own imports, for every model); any other name is an installed module."""
    import importlib
    import importlib.util

    entry = spec.parameters.get("entry_point", "")
    if not entry and (spec.path / "model.py").is_file():
        entry = DEFAULT_ENTRY_POINT
    module_name, _, attr = entry.partition(":")
    if not module_name or not attr:
        raise UsageError(f'model {spec.name}: a state dict needs a model.py defining model(), or parameters '
                         f'entry_point = "module:factory"')  # fmt: skip
    local = spec.path / f"{module_name}.py"
    try:
        if module_name.isidentifier() and local.is_file():
            loader = importlib.util.spec_from_file_location(f"modelseal_entry_{spec.name}_{module_name}", local)
            if loader is None or loader.loader is None:
                raise ImportError(f"cannot load {local}")
            entry_module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(entry_module)
        else:
            entry_module = importlib.import_module(module_name)
        factory = getattr(entry_module, attr)
    except (ImportError, AttributeError, SyntaxError) as exc:
        raise UsageError(f"model {spec.name}: cannot import entry point {entry}: {exc}") from None
    return (factory(), entry_module) if with_entry else factory()


RUNTIME = RuntimeInfo(
    "pytorch_libtorch",
    TorchRuntime,
    ("model.pt.sealed", "model.pt", "model.safetensors.sealed", "model.safetensors"),
    backend="pytorch",
)
