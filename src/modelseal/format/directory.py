"""Sealed directories (e.g. a Hugging Face model directory).

Every ``*.safetensors`` file becomes a sealed safetensors file, every other file a sealed bundle, under
the same relative path. All files share one data key (one unwrap per directory, even for a passphrase)
but each has its own artifact id, hence its own payload key and nonces. Each protected header names
the directory group, the file's own relative path and the full member list, so renaming, removing or
swapping in a file from another sealed model is detected when the directory is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from modelseal.crypto import keys
from modelseal.encoding import b64e
from modelseal.errors import AuthenticationError, FormatError, UsageError
from modelseal.format.container import Artifact

MARKER_KEY = "group"

A = TypeVar("A", bound=Artifact)
MemberOpener = Callable[[Any, dict[bytes, bytearray]], A]
"""Opens one member file: (its location, the directory's shared data-key cache) -> an open artifact.
The location is ``root / rel`` for a local directory, whatever ``locate`` returns otherwise (a URL)."""


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


def check_group(
    root: str | os.PathLike[str], artifacts: dict[str, Artifact], present: Collection[str] | None = None
) -> None:
    """All files belong to one sealed directory, sit at their sealed paths, and none is missing.

    ``present`` is what the directory holds (default: the files under the local ``root``; a remote store
    passes its listing)."""
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
        have = set(list_members(Path(root))) if present is None else set(present)
        missing = [m for m in members if m not in have]
        if missing:
            raise AuthenticationError(f"{root} is missing sealed files: {', '.join(missing[:5])}")


@contextmanager
def open_directory(
    root: str | os.PathLike[str],
    open_member: MemberOpener[A],
    *,
    members: Sequence[str] | None = None,
    check: bool = True,
    locate: Callable[[str], Any] | None = None,
    present: Collection[str] | None = None,
) -> Iterator[dict[str, A]]:
    """Open every member of a sealed directory: ``{relative path: artifact}``, closed and wiped on exit.

    Members are opened in order with ``open_member(path, cache)``; the cache lets them share one
    unwrap of the directory's data key (a passphrase is stretched once, an agent asked once). With
    ``check`` the members must form the directory they were sealed as (:func:`check_group`) before
    the caller sees any of them. On exit, however it happens, every artifact is closed (wiping its
    data key) and the cache is wiped. ``members`` (default: every file under ``root``) also lets a
    single sealed file go through the same path, with ``check=False``. A directory that is not local (a
    URL prefix) passes its ``members``, ``locate`` (relative path -> what ``open_member`` takes) and what is
    ``present`` there.
    """
    names = list_members(Path(root)) if members is None else list(members)
    where = locate or (lambda rel: Path(root) / rel)
    cache: dict[bytes, bytearray] = {}
    arts: dict[str, A] = {}
    try:
        for rel in names:
            arts[rel] = open_member(where(rel), cache)
        if check:
            check_group(root, dict(arts), present)
        yield arts
    finally:
        for art in arts.values():
            art.close()
        wipe_cache(cache)


def wipe_cache(cache: dict[bytes, bytearray]) -> None:
    for dek in cache.values():
        keys.wipe(dek)
    cache.clear()
