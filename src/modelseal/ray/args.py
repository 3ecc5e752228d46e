"""The arguments a Ray Serve replica of a sealed model gets: checked in the driver (before anything
reaches Ray) and again in each replica. Only strings, numbers and lists of strings: Ray keeps a
deployment's arguments and runtime_env in its GCS, so key text is refused in both."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from modelseal.errors import UsageError
from modelseal.recipients.registry import is_identity_text

MIN_KEY_CHECK_S = 0.5  # as inside Triton: 1e-300 would be a busy loop asking the agent
MAX_KEY_CHECK_S = 86400.0
MIN_RETRY_S = 1.0
MAX_GRACE_S = 3600.0  # an agent killed on the node keeps a revoked model serving at most this long
MAX_BODY_BYTES = 64 * 1024 * 1024  # modelseal serve's default


def _seconds(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"modelseal.ray: {key} must be a number of seconds")
    if not low <= value <= high:
        raise UsageError(f"modelseal.ray: {key} must be between {low:g} and {high:g} seconds")
    return float(value)


def _strings(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"modelseal.ray: {key} must be a list of non-empty strings")
    return tuple(value)


def _retry_s(value: object) -> float:
    retry_s = _seconds("retry_s", value, 0, MAX_KEY_CHECK_S)
    if 0 < retry_s < MIN_RETRY_S:  # each retry asks the agent, and the agent may ask the key service
        raise UsageError(f"modelseal.ray: retry_s must be 0 (no retry) or at least {MIN_RETRY_S:g} s")
    return retry_s


def _identity(identity: object) -> str | None:
    """The identity *reference*: never the key itself, which would travel through Ray's controller and
    stay in the cluster's GCS with the deployment's arguments."""
    if identity is None or identity == "":
        return None
    if not isinstance(identity, str):
        raise UsageError("modelseal.ray: identity must be a string (agent:SOCKET, env:VAR or a key file path)")
    if is_identity_text(identity) or not identity.isprintable():
        raise UsageError("modelseal.ray: identity holds a key (or is not one printable line); name agent:SOCKET, "
                         "env:VAR or a key file path: Ray keeps a deployment's arguments in its GCS")  # fmt: skip
    return identity


def replica_args(
    sealed: str | os.PathLike[str],
    *,
    name: str,
    identity: str | None = None,
    platform: str = "",
    max_batch_size: int = 0,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    key_check_s: float = 5.0,
    grace_s: float = 30.0,
    retry_s: float = 30.0,
    threads: int = 0,
    trusted_signers: Sequence[str] = (),
    entry_point: str = "",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> dict[str, Any]:
    """The replica's init arguments, checked: strings, numbers and tuples of strings only (what Ray may
    carry and keep). ``sealed``: the sealed model file, directory or remote pointer file (docs/remote.md)
    at the same path on every node (made absolute here: a replica's working directory is Ray's);
    ``inputs``/``outputs``: ``NAME:DATATYPE:DIMS`` strings, for a model that does not declare them."""
    from modelseal.triton.layout import tensor_option

    if not isinstance(sealed, str | os.PathLike):
        raise UsageError("modelseal.ray: the sealed model must be a path")
    path = os.fspath(sealed)
    if "://" in path:
        raise UsageError(f"modelseal.ray: {path[:80]!r} is a URL; name a pointer file holding it "
                         "('modelseal-remote: URL', docs/remote.md) at the same path on every node")  # fmt: skip
    if not isinstance(name, str) or not name or "/" in name or len(name) > 200 or not name.isprintable():
        raise UsageError("modelseal.ray: name must be a model name (printable, no '/', at most 200 characters)")
    for key, value in (("platform", platform), ("entry_point", entry_point)):
        if not isinstance(value, str):
            raise UsageError(f"modelseal.ray: {key} must be a string")
    numbers = {"max_batch_size": (max_batch_size, 1 << 20), "threads": (threads, 1024),
               "max_body_bytes": (max_body_bytes, 1 << 40)}  # fmt: skip
    for key, (number, high) in numbers.items():
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= high:
            raise UsageError(f"modelseal.ray: {key} must be a whole number from 0 to {high}")
    check_s = _seconds("key_check_s", key_check_s, 0, MAX_KEY_CHECK_S)
    if 0 < check_s < MIN_KEY_CHECK_S:
        raise UsageError(f"modelseal.ray: key_check_s must be 0 (no key watch) or at least {MIN_KEY_CHECK_S:g} s")
    tensors = {key: _strings(key, value) for key, value in (("inputs", inputs), ("outputs", outputs))}
    for text in (*tensors["inputs"], *tensors["outputs"]):
        tensor_option(text)  # refused here, in the driver, rather than on every replica
    return {
        "sealed": os.path.abspath(path),
        "name": name,
        "identity": _identity(identity),
        "platform": platform,
        "max_batch_size": max_batch_size,
        "inputs": tensors["inputs"],
        "outputs": tensors["outputs"],
        "key_check_s": check_s,
        "grace_s": _seconds("grace_s", grace_s, 0, MAX_GRACE_S),
        "retry_s": _retry_s(retry_s),
        "threads": threads,
        "trusted_signers": _strings("trusted_signers", trusted_signers),
        "entry_point": entry_point,
        "max_body_bytes": max_body_bytes,
    }


def check_options(options: Mapping[str, Any]) -> None:
    """Serve's deployment options pass through; a runtime_env variable holding key text is refused (Ray
    keeps the runtime_env in its GCS and hands it to every worker)."""
    if "name" in options:
        raise UsageError("modelseal.ray: the deployment is named by name=, which is also the model's name")
    actor = options.get("ray_actor_options") or {}
    runtime_env = actor.get("runtime_env") or {} if isinstance(actor, Mapping) else {}
    env = runtime_env.get("env_vars") or {} if isinstance(runtime_env, Mapping) else {}
    if isinstance(env, Mapping) and any(isinstance(v, str) and is_identity_text(v) for v in env.values()):
        raise UsageError("modelseal.ray: a runtime_env variable holds a key; set it in the node's environment "
                         "(or use agent:SOCKET): Ray keeps runtime_env in its GCS")  # fmt: skip
