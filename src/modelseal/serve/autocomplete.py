"""Config auto-completion, as Triton does it: a model dropped into the repository without a config (or
with one that leaves out inputs or outputs) is served with a config completed from the model itself.

The model is asked once, at load, through its runtime's :meth:`~.runtimes.base.Runtime.declared` (the
ONNX graph's inputs and outputs, the SavedModel signature, the OpenVINO model, TVM's exported metadata,
a PyTorch module's ``forward`` and example inputs): the load decrypts what it decrypts anyway, and
nothing more. What the config does declare is kept and checked against the model afterwards
(:mod:`.runtimes.declared`). The batch dimension: a config that sets ``max_batch_size`` keeps it; a model
completed from nothing batches (``max_batch_size`` = the repository's ``default_max_batch_size``, 4 as in
Triton) when every input and output has a variable first dimension, else it does not (0).

:func:`effective_config` is the completed config as ``GET /v2/models/X/config`` and gRPC ``ModelConfig``
answer it, in Triton's field names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec
from modelseal.serve.runtimes.base import Declared, Signature


def _unknown(spec: ModelSpec, what: str, why: str) -> ConfigError:
    return ConfigError(f"model {spec.name}: its config declares no {what}s and the model cannot tell them ({why}): "
                       f"declare the {what}s in {spec.path}/config.pbtxt")  # fmt: skip


def _tensors(spec: ModelSpec, what: str, found: dict[str, Declared] | None, batching: bool) -> tuple[TensorSpec, ...]:
    if not found:
        raise _unknown(spec, what, "no signature" if found is None else f"it declares no {what}s")
    tensors = []
    for name, (datatype, shape) in found.items():
        if datatype is None or shape is None:
            raise _unknown(spec, what, f"{what} {name!r} has an unknown {'data type' if datatype is None else 'shape'}")
        dims = tuple(-1 if d is None else d for d in (shape[1:] if batching else shape))
        tensors.append(TensorSpec(name, datatype, dims))
    return tuple(tensors)


def _batches(found: Signature) -> bool:
    """Every input and output has a variable first dimension (so the model takes a batch of any size)."""
    shapes = [shape for side in found if side for _, shape in side.values()]
    return bool(shapes) and all(shape is not None and len(shape) > 0 and shape[0] is None for shape in shapes)


def complete(spec: ModelSpec, found: Signature, default_max_batch_size: int) -> ModelSpec:
    """``spec`` with its missing inputs/outputs (and, for a config that declares neither, max_batch_size)
    taken from what the model declares; ``spec`` itself when it is complete."""
    if spec.complete:
        return spec
    max_batch_size = spec.max_batch_size
    if not spec.inputs and not spec.outputs and max_batch_size == 0 and _batches(found):
        max_batch_size = default_max_batch_size
    batching = max_batch_size > 0
    inputs = spec.inputs or _tensors(spec, "input", found[0], batching)
    outputs = spec.outputs or _tensors(spec, "output", found[1], batching)
    return dataclasses.replace(spec, inputs=inputs, outputs=outputs, max_batch_size=max_batch_size)


def effective_config(spec: ModelSpec, device: str = "cpu") -> dict[str, Any]:
    """The (completed) config as a JSON object with Triton's field names (``device``: where the
    instances run, cpu or cuda)."""

    def tensor(t: TensorSpec, output: bool) -> dict[str, Any]:
        data_type = f"TYPE_{'STRING' if t.datatype == 'BYTES' else t.datatype}"
        entry: dict[str, Any] = {"name": t.name, "data_type": data_type, "dims": list(t.dims)}
        if output and t.label_filename:
            entry["label_filename"] = t.label_filename
        return entry

    config: dict[str, Any] = {
        "name": spec.name,
        "platform": spec.platform,
        "backend": spec.backend,
        "version_policy": spec.version_policy.config(),
        "max_batch_size": spec.max_batch_size,
        "input": [tensor(t, False) for t in spec.inputs],
        "output": [tensor(t, True) for t in spec.outputs],
        "instance_group": [{"name": spec.name, "count": spec.instances,
                            "kind": "KIND_CPU" if device == "cpu" else "KIND_GPU"}],
        "default_model_filename": spec.default_model_filename or "",
        "parameters": {k: {"string_value": v} for k, v in spec.parameters.items()},
    }
    if spec.max_queue_delay_s is not None:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(spec.preferred_batch_sizes),
            "max_queue_delay_microseconds": round(spec.max_queue_delay_s * 1e6),
        }
    return config
