"""``modelseal.transformers``: Hugging Face model directories sealed with ``modelseal seal DIR``.

The sealed directory keeps its layout: ``config.json``, tokenizer files and so on are sealed bundles
under their own names (or left plain by the owner), weight shards are sealed safetensors. Loading checks
that every sealed file belongs to the same sealed directory, sits at its sealed path, and that none is
missing (:mod:`modelseal.load.hfdir`).

:func:`from_pretrained` and :func:`tokenizer` build transformers objects without a plaintext file: the
configuration and tokenizer files are read from a private RAM directory that is gone when they return,
and the weights are decrypted straight into the tensors the model keeps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import MissingDependencyError, UsageError
from modelseal.format import schema
from modelseal.format.bundle import SealedBundle
from modelseal.jsonlimits import loads_bounded
from modelseal.load.hfdir import ModelDir, open_model_dir, stage
from modelseal.load.tensors import decrypt_tensors
from modelseal.recipients.registry import IdentitySpec

MAX_CONFIG = 16 << 20  # a config.json is a few KiB; the cap only bounds what a damaged file can cost


def _state(model: ModelDir, framework: str, device: str, allow_plain: bool) -> dict[str, Any]:
    """Every tensor of every shard (sealed, and plain ones where allowed), in one dict."""
    state: dict[str, Any] = {}

    def add(name: str, tensor: Any) -> None:
        if name in state:
            raise UsageError(f"tensor {name!r} appears in two shards of {model.root}")
        state[name] = tensor

    for shard in model.shards:
        for name, tensor in decrypt_tensors(shard, shard.entries, framework, device).items():
            add(name, tensor)
    if allow_plain:
        from safetensors import safe_open

        for rel in (r for r in model.plain if r.endswith(".safetensors")):
            with safe_open(str(model.root / rel), "np" if framework == "np" else "pt", device=device) as f:
                for name in f.keys():
                    add(name, f.get_tensor(name))
    if not state:
        raise UsageError(f"{model.root} contains no sealed .safetensors files")
    return state


def load_state_dict(
    model_dir: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    framework: str = "pt",
    device: str = "cpu",
    trusted_signers: Sequence[str] | None = None,
    allow_plain: bool = False,
) -> dict[str, Any]:
    """Every tensor of every sealed shard of a model directory, in one dict."""
    fw = "np" if framework in ("np", "numpy") else "pt"
    with open_model_dir(model_dir, identity, trusted_signers=trusted_signers, allow_plain=allow_plain) as model:
        return _state(model, fw, device, allow_plain)


def read_file(model_dir: str | os.PathLike[str], name: str, *, identity: IdentitySpec | None = None) -> bytearray:
    """Decrypt one non-weight file (e.g. ``config.json``) of a sealed model directory."""
    with open_model_dir(model_dir, identity) as model:
        art = model.sealed.get(name)
        if not isinstance(art, SealedBundle):
            raise UsageError(f"{model_dir} has no sealed file {name!r} (weights load with load_state_dict)")
        return art.read()


def load_config(model_dir: str | os.PathLike[str], *, identity: IdentitySpec | None = None) -> dict[str, Any]:
    """The model's ``config.json`` as a dict."""
    what = f"{Path(model_dir) / 'config.json'}"
    raw = read_file(model_dir, "config.json", identity=identity)
    try:
        cfg = loads_bounded(raw, max_bytes=MAX_CONFIG, max_depth=64, what=what)
    finally:
        keys.wipe(raw)
    return schema.obj(cfg, what)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("this needs transformers: pip install 'modelseal[transformers]'") from None
    return transformers


def _concrete(model_class: Any, config: Any) -> Any:
    """The model class for ``config``: ``model_class`` itself, or the one an Auto class maps it to."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, mapping)
    except (KeyError, ValueError):
        raise UsageError(f"{model_class.__name__} has no model class for {type(config).__name__}") from None


def from_pretrained(
    model_class: Any,
    model_dir: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
    allow_plain: bool = False,
    **kwargs: Any,
) -> Any:
    """``model_class.from_pretrained(model_dir, **kwargs)`` for a sealed model directory.

    ``model_class`` is a transformers model class or Auto class (``AutoModelForCausalLM``); sharded
    checkpoints load as they are. ``kwargs`` go to ``from_pretrained`` (``torch_dtype``, ``device_map``...).
    """
    transformers = _transformers()
    with open_model_dir(model_dir, identity, trusted_signers=trusted_signers, allow_plain=allow_plain) as model:
        with stage(model) as staged:
            config = transformers.AutoConfig.from_pretrained(staged.path)
            generation = (
                transformers.GenerationConfig.from_pretrained(staged.path)
                if (staged.path / "generation_config.json").exists()
                else None
            )
        state = _state(model, "pt", "cpu", allow_plain)
    loaded = _concrete(model_class, config).from_pretrained(None, config=config, state_dict=state, **kwargs)
    if generation is not None:
        loaded.generation_config = generation
    return loaded


def tokenizer(
    model_dir: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    allow_plain: bool = False,
    **kwargs: Any,
) -> Any:
    """``AutoTokenizer.from_pretrained`` for a sealed model (or tokenizer) directory; ``kwargs`` go to it."""
    transformers = _transformers()
    with open_model_dir(model_dir, identity, allow_plain=allow_plain) as model, stage(model) as staged:
        return transformers.AutoTokenizer.from_pretrained(staged.path, **kwargs)
