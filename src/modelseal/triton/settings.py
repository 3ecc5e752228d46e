"""What a sealed model inside Triton is told: its config.pbtxt ``parameters``, checked strictly.

Triton hands the Python backend the model's config as JSON. Its ``parameters`` carry modelseal's settings
as strings (Triton has no other place for them); names in capitals (``EXECUTION_ENV_PATH``...) belong to
Triton and are left alone, and any other unknown name is refused, so a typo (``identiy``) cannot silently
fall back to another identity or switch the key watch off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.errors import UsageError
from modelseal.recipients.registry import is_identity_text
from modelseal.serve import datatypes
from modelseal.serve.repository import ModelSpec, TensorSpec, _plain_name
from modelseal.serve.runtimes.base import registry

KNOWN = ("sealed_file", "platform", "identity", "key_check_s", "grace_s", "threads", "trusted_signers",
         "entry_point")  # fmt: skip
PLATFORMS = ("onnxruntime_onnx", "pytorch_libtorch")  # what runs (and is tested) in Triton's stub
MIN_KEY_CHECK_S = 0.5
MAX_GRACE_S = 3600.0  # an agent killed on the host keeps a revoked model serving at most this long


@dataclass(frozen=True)
class Settings:
    sealed_file: str = ""
    """The model file in the version directory; default: the platform's (model.onnx.sealed, model.pt.sealed,
    model.safetensors.sealed)."""
    platform: str = ""
    """onnxruntime_onnx or pytorch_libtorch; default: the platform whose model file the directory holds."""
    identity: str | None = None
    """agent:SOCKET or a key file; default ``$MODELSEAL_IDENTITY``, then ``$MODELSEAL_AGENT_SOCKET``."""
    key_check_s: float = 5.0
    """How often the agent is asked whether it still releases the key (0: never)."""
    grace_s: float = 30.0
    """How long the agent may stay silent before the model refuses (at most an hour); a refusal (revoked,
    expired) acts at once."""
    threads: int = 0
    """Intra-op threads of the framework (0: its default)."""
    trusted_signers: tuple[str, ...] = ()
    """Ed25519 public keys (comma-separated) of which one must have signed the sealed file."""


def _seconds(raw: Mapping[str, str], key: str, default: float, high: float) -> float:
    try:
        value = float(raw.get(key, default))
    except ValueError:
        raise UsageError(f"parameter {key!r} must be a number of seconds, not {raw[key][:40]!r}") from None
    if not math.isfinite(value) or not 0 <= value <= high:
        raise UsageError(f"parameter {key!r} must be between 0 and {high:g} seconds")
    return value


def parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The string values of Triton's JSON ``parameters`` (``{"k": {"string_value": "v"}}``)."""
    found = config.get("parameters") or {}
    return {str(k): str(v.get("string_value", "")) if isinstance(v, Mapping) else str(v) for k, v in found.items()}


def _identity(raw: Mapping[str, str]) -> str | None:
    """The ``identity`` parameter: where the key comes from, never the key itself (Triton shows a model's
    config, parameters included, to any client of ``/v2/models/NAME/config``, and logs it)."""
    identity = raw.get("identity") or None
    if identity is not None and (is_identity_text(identity) or not identity.isprintable()):
        raise UsageError("parameter 'identity' holds a key (or is not one printable line); name agent:SOCKET, "
                         "env:VAR or a key file: config.pbtxt is shown to Triton's clients")  # fmt: skip
    return identity


def parse_settings(raw: Mapping[str, str]) -> Settings:
    """``raw`` (the config's parameters) as :class:`Settings`, or a one-line error naming the parameter."""
    unknown = sorted(k[:40] for k in raw if k not in KNOWN and (not k.isupper() or k.lower() in KNOWN))
    if unknown:  # capitals are Triton's, except modelseal's own names in capitals (a typo, not Triton's)
        raise UsageError(f"unknown modelseal parameter(s) {unknown} in config.pbtxt; known: {list(KNOWN)}")
    sealed_file = raw.get("sealed_file", "")
    if sealed_file and not _plain_name(sealed_file):
        raise UsageError("parameter 'sealed_file' must name a file in the version directory, not a path")
    try:
        threads = int(raw.get("threads", "0"))
    except ValueError:
        threads = -1
    if not 0 <= threads <= 1024:
        raise UsageError("parameter 'threads' must be a whole number from 0 to 1024")
    signers = tuple(s.strip() for s in raw.get("trusted_signers", "").split(",") if s.strip())
    platform = raw.get("platform", "")
    if platform and platform not in PLATFORMS:
        raise UsageError(f"parameter 'platform' must be one of {', '.join(PLATFORMS)} inside Triton")
    key_check_s = _seconds(raw, "key_check_s", 5.0, 86400)
    if 0 < key_check_s < MIN_KEY_CHECK_S:  # 1e-300 is a busy loop asking the agent
        raise UsageError(f"parameter 'key_check_s' must be 0 (no key watch) or at least {MIN_KEY_CHECK_S:g} s")
    return Settings(
        sealed_file=sealed_file,
        platform=platform,
        identity=_identity(raw),
        key_check_s=key_check_s,
        grace_s=_seconds(raw, "grace_s", 30.0, MAX_GRACE_S),
        threads=threads,
        trusted_signers=signers,
    )


def _tensors(items: Any, what: str, name: str) -> tuple[TensorSpec, ...]:
    specs = []
    for t in items or ():
        datatype = datatypes.from_config(str(t.get("data_type", "")))
        if datatype in ("BYTES", "BF16"):  # DLPack (the only safe path beside numpy 2) carries neither
            raise UsageError(f"model {name}: {what} {t.get('name')!r} is {datatype}; inside Triton only numeric "
                             "tensors numpy can hold are served (use modelseal serve for BYTES and BF16)")  # fmt: skip
        specs.append(TensorSpec(str(t["name"]), datatype, tuple(int(d) for d in t.get("dims", ()))))
    return tuple(specs)


def model_spec(config: Mapping[str, Any], model_dir: Path, version: int, settings: Settings) -> ModelSpec:
    """Triton's config (JSON, as ``initialize`` gets it) as the :class:`ModelSpec` the runtimes take.
    ``model_dir`` is the model's directory (a state dict's ``entry_point`` module is looked for there)."""
    name = str(config.get("name", model_dir.name))
    platform = settings.platform or guess_platform(model_dir / str(version), settings.sealed_file)
    if platform not in PLATFORMS or registry().get(platform) is None:
        raise UsageError(f"model {name}: platform {platform!r} is not served inside Triton (parameter 'platform': "
                         f"one of {', '.join(PLATFORMS)})")  # fmt: skip
    return ModelSpec(
        name=name,
        path=model_dir,
        platform=platform,
        max_batch_size=max(0, int(config.get("max_batch_size", 0))),
        inputs=_tensors(config.get("input"), "input", name),
        outputs=_tensors(config.get("output"), "output", name),
        default_model_filename=settings.sealed_file or None,
        parameters=parameters(config),
    )


def guess_platform(version_dir: Path, sealed_file: str = "") -> str:
    """The platform whose default model file the version directory holds (or whose suffix ``sealed_file``
    ends with), as Triton guesses from ``model.onnx``, ``model.pt``."""
    runtimes = registry()
    for platform in runtimes.platforms():
        info = runtimes.get(platform)
        files = info.files if info is not None else ()
        suffixes = [f.removeprefix("model") for f in files]  # .onnx.sealed, .pt.sealed...
        found = any(sealed_file.endswith(s) for s in suffixes) if sealed_file else any(
            (version_dir / f).exists() for f in files)  # fmt: skip
        if found:
            return platform
    raise UsageError(f"no model file in {version_dir} tells its platform; set parameter 'platform' "
                     f"({', '.join(runtimes.platforms())})")  # fmt: skip
