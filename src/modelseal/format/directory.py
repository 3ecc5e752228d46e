"""Sealed directories (e.g. a Hugging Face model directory).

Every ``*.safetensors`` file becomes a sealed safetensors file, every other file a sealed bundle, under
the same relative path. All files share one data key (one unwrap per directory, even for a passphrase)
but each has its own artifact id, hence its own payload key and nonces. Each protected header names
the directory group, the file's own relative path and the full member list, so renaming, removing or
swapping in a file from another sealed model is detected when the directory is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelseal.crypto import keys
from modelseal.encoding import b64e
from modelseal.errors import AuthenticationError, FormatError, UsageError
from modelseal.format.container import Artifact

MARKER_KEY = "group"


def new_group(members: list[str]) -> dict[str, Any]:
    return {"id": b64e(os.urandom(16)), "members": sorted(members)}


def member_group(group: dict[str, Any], path: str) -> dict[str, Any]:
    return {**group, "path": path}


def list_members(root: Path) -> list[str]:
    """Relative paths of every regular file under ``root``."""
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            p = Path(dirpath) / n
            if p.is_symlink() or not p.is_file():
                raise UsageError(f"{p} is a link or special file; sealed directories hold regular files only")
            out.append(p.relative_to(root).as_posix())
    return out


def check_group(root: Path, artifacts: dict[str, Artifact]) -> None:
    """All files belong to one sealed directory, sit at their sealed paths, and none is missing."""
    group_ids, members = set(), None
    for rel, art in artifacts.items():
        g = art.envelope.protected.get(MARKER_KEY)
        if not isinstance(g, dict):
            raise FormatError(f"{art.path} was sealed on its own, not as part of the directory {root}")
        if g.get("path") != rel:
            raise AuthenticationError(f"{art.path} was sealed as {g.get('path')!r}: files were renamed or swapped")
        group_ids.add(g.get("id"))
        members = g.get("members")
    if len(group_ids) > 1:
        raise AuthenticationError(f"{root} mixes files from different sealed models (swapped files?)")
    if members is not None:
        present = set(list_members(root))
        missing = [m for m in members if m not in present]
        if missing:
            raise AuthenticationError(f"{root} is missing sealed files: {', '.join(missing[:5])}")


def wipe_cache(cache: dict[bytes, bytearray]) -> None:
    for dek in cache.values():
        keys.wipe(dek)
    cache.clear()
