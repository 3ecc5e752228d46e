"""What a model itself declares about its tensors, checked against its config at load, so that a
mismatch is a clear UNAVAILABLE reason naming the fix instead of a failure on the first request.
Each runtime's ``check`` compares its own ``declared()`` with the config through :func:`check_tensors`;
PyTorch, whose tensors are positional, also calls :func:`check_arity` (the count ``forward`` accepts) and
compares datatypes and ranks only where example inputs tell them."""

from __future__ import annotations

import inspect
from typing import Any

from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec
from modelseal.serve.runtimes.base import Declared


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
