"""The ``--model-loader-extra-config`` of ``--load-format modelseal``: parsed strictly, before any key.

Unknown keys and wrong types are refused by name, so a typo (``"identiy"``) cannot silently fall back to
another identity or switch a safety off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelseal.errors import UsageError

LOAD_FORMAT = "modelseal"


@dataclass(frozen=True)
class LoaderOptions:
    identity: str | None = None
    """An identity spec (``agent:/run/modelseal/agent.sock``, a key file, ``env:VAR``); default
    ``$MODELSEAL_IDENTITY`` or ``$MODELSEAL_AGENT_SOCKET``."""
    trusted_signers: tuple[str, ...] = ()
    """Ed25519 public keys of which one must have signed every sealed file."""
    allow_plain: bool = False
    """Load plain (unsealed) weight files too; off by default, so a swapped-in plain file is refused."""
    lazy: bool | None = None
    """Decrypt what each layer takes straight into its parameter (only the rank's part under tensor
    parallelism); default: when tensor parallel size > 1. False: whole tensors in batches on all cores,
    then vLLM copies them (measured faster at TP=1: docs/benchmarks.md)."""
    key_check_s: float = 30.0
    """How often the lease watchdog asks the agent whether the key is still released (0: never)."""
    grace_s: float = 60.0
    """How long the key may stay refused, or the agent silent, before the engine stops."""
    meter: bool | None = None
    """Count requests and tokens for the licence and report them to the agent (:mod:`modelseal.vllm.metering`);
    default: on with an ``agent:`` identity. ``true`` with another identity is refused (no agent to report to)."""


def _number(raw: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**12:
        value = math.inf  # refused below, as float() would overflow
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{LOAD_FORMAT} loader option {key!r} must be a number of seconds")
    if not low <= value <= high:
        raise UsageError(f"{LOAD_FORMAT} loader option {key!r} must be between {low:g} and {high:g}")
    return float(value)


def parse_options(raw: Any) -> LoaderOptions:
    """``--model-loader-extra-config`` (a dict) as :class:`LoaderOptions`, or a clear error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UsageError(f"the {LOAD_FORMAT} loader options must be a JSON object, not {type(raw).__name__}")
    known = set(LoaderOptions.__dataclass_fields__)
    unknown = sorted(str(k)[:40] for k in raw if k not in known)
    if unknown:
        raise UsageError(f"unknown {LOAD_FORMAT} loader option(s) {unknown}; known: {sorted(known)}")
    identity = raw.get("identity")
    if identity is not None and (not isinstance(identity, str) or not identity):
        raise UsageError(f"{LOAD_FORMAT} loader option 'identity' must be a non-empty string (an identity spec)")
    signers = raw.get("trusted_signers", [])
    if isinstance(signers, str):
        signers = [signers]
    if not isinstance(signers, list) or not all(isinstance(s, str) and s for s in signers):
        raise UsageError(f"{LOAD_FORMAT} loader option 'trusted_signers' must be a list of public keys")
    for key in ("allow_plain", "lazy", "meter"):
        if key in raw and not isinstance(raw[key], bool) and not (key in ("lazy", "meter") and raw[key] is None):
            raise UsageError(f"{LOAD_FORMAT} loader option {key!r} must be true or false")
    return LoaderOptions(
        identity=identity,
        trusted_signers=tuple(signers),
        allow_plain=bool(raw.get("allow_plain", False)),
        lazy=raw.get("lazy"),
        meter=raw.get("meter"),
        key_check_s=_number(raw, "key_check_s", 30.0, 0, 86400),
        grace_s=_number(raw, "grace_s", 60.0, 0, 7 * 86400),
    )
