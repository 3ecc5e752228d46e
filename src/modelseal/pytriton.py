"""Serve a sealed model with PyTriton (``nvidia-pytriton``), for users who start Triton from Python.

::

    from pytriton.triton import Triton
    import modelseal.pytriton

    with Triton() as triton:
        modelseal.pytriton.bind(triton, "resnet50", "model.onnx.sealed", identity="agent:/run/modelseal/agent.sock")
        triton.serve()

The model is decrypted in memory in this process (PyTriton runs the inference function here; Triton's
stub only relays tensors through shared memory), by the same loader and runtime as ``modelseal serve``
and the Triton Python-backend model (:class:`modelseal.triton.sealed.SealedModel`), with the same key
watch: once the agent refuses the key, the model is wiped and every request gets the reason. Inputs and
outputs come from the model (or ``inputs``/``outputs``), as ``modelseal serve`` completes a config.
PyTriton 0.7 needs numpy below 2 in its environment (its relay reads tensors with ``as_numpy``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError, ModelsealError
from modelseal.serve import datatypes
from modelseal.serve.repository import ModelSpec, TensorSpec
from modelseal.triton.sealed import SealedModel, client_message
from modelseal.triton.settings import Settings, guess_platform


def bind(
    triton: Any,
    name: str,
    sealed: str | Path,
    *,
    identity: str | None = None,
    platform: str = "",
    max_batch_size: int | None = None,
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
    settings: Settings | None = None,
    entry_point: str = "",
) -> SealedModel:
    """Load ``sealed`` and bind it to ``triton`` (a ``pytriton.triton.Triton``) as ``name``; the loaded
    model is returned (``close()`` it to wipe it early; the key watch runs until then). ``settings``:
    key_check_s, grace_s, threads, trusted_signers as in config.pbtxt's parameters; ``entry_point``: a
    state dict's ``module:callable`` building its module, the module beside ``sealed``."""
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import ModelConfig, Tensor
    except ImportError:
        raise MissingDependencyError("modelseal.pytriton needs PyTriton: pip install nvidia-pytriton") from None
    sealed = Path(sealed)
    settings = settings or Settings()
    if identity:
        settings = dataclasses.replace(settings, identity=identity)
    platform = platform or settings.platform or guess_platform(sealed.parent, sealed.name)
    spec = ModelSpec(name, sealed.parent, platform, max_batch_size or 0, tuple(inputs), tuple(outputs),
                     parameters={"entry_point": entry_point} if entry_point else {})  # fmt: skip
    model = SealedModel.load(spec, sealed, settings)
    spec = model.spec

    def tensors(items: tuple[TensorSpec, ...]) -> list[Any]:
        return [Tensor(name=t.name, dtype=datatypes.numpy_dtype(t.datatype), shape=t.dims) for t in items]

    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return model.run(inputs, [t.name for t in spec.outputs])
        except Exception as exc:  # PyTriton sends the text to the client: never a framework's (tensor values)
            raise ModelsealError(client_message(exc)) from None

    def each(requests: list[Any]) -> list[dict[str, np.ndarray]]:  # PyTriton's form for a model that does not batch
        return [infer(**dict(r)) for r in requests]

    triton.bind(model_name=name, infer_func=batch(infer) if spec.batching else each, inputs=tensors(spec.inputs),
                outputs=tensors(spec.outputs), config=ModelConfig(max_batch_size=spec.max_batch_size))  # fmt: skip
    return model
