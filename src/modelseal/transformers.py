"""``modelseal.transformers``: Hugging Face model directories sealed with ``modelseal seal DIR``.

The sealed directory keeps its layout: ``config.json``, tokenizer files and so on are sealed bundles
under their own names, weight shards are sealed safetensors. Loading checks that every file belongs to
the same sealed directory, sits at its sealed path, and that none is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import UsageError
from modelseal.format import directory, schema
from modelseal.format.bundle import SealedBundle
from modelseal.format.container import Artifact
from modelseal.format.safetensors import SealedSafetensors
from modelseal.jsonlimits import loads_bounded
from modelseal.load.artifacts import open_artifact, resolve_identity
from modelseal.load.tensors import decrypt_tensors
from modelseal.recipients.registry import IdentitySpec

MAX_CONFIG = 16 << 20  # a config.json is a few KiB; the cap only bounds what a damaged file can cost


def _open_dir(
    root: Path, identity: IdentitySpec | None, trusted_signers: Sequence[str] | None = None
) -> ContextManager[dict[str, Artifact]]:
    """Every member of the sealed directory ``root``, unlocked with one identity and checked as a group."""
    ident = resolve_identity(identity)

    def member(path: Path, cache: dict[bytes, bytearray]) -> Artifact:
        return open_artifact(path, ident, trusted_signers=trusted_signers, dek_cache=cache)

    return directory.open_directory(root, member)


def load_state_dict(
    model_dir: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    framework: str = "pt",
    device: str = "cpu",
    trusted_signers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every tensor of every sealed shard of a model directory, in one dict."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    with _open_dir(root, identity, trusted_signers) as arts:
        shards = [a for a in arts.values() if isinstance(a, SealedSafetensors)]
        if not shards:
            raise UsageError(f"{root} contains no sealed .safetensors files")
        fw = "np" if framework in ("np", "numpy") else "pt"
        state: dict[str, Any] = {}
        for shard in shards:
            for name, tensor in decrypt_tensors(shard, shard.entries, fw, device).items():
                if name in state:
                    raise UsageError(f"tensor {name!r} appears in two shards of {root}")
                state[name] = tensor
    return state


def read_file(model_dir: str | os.PathLike[str], name: str, *, identity: IdentitySpec | None = None) -> bytearray:
    """Decrypt one non-weight file (e.g. ``config.json``) of a sealed model directory."""
    root = Path(model_dir)
    with _open_dir(root, identity) as arts:
        art = arts.get(name)
        if not isinstance(art, SealedBundle):
            raise UsageError(f"{root} has no sealed file {name!r} (weights load with load_state_dict)")
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
