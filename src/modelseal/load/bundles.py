"""Read files out of sealed bundles and sealed directories, into memory only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from modelseal.errors import UsageError
from modelseal.format.bundle import SealedBundle
from modelseal.load.artifacts import open_artifact
from modelseal.recipients.registry import IdentitySpec


def open_bundle(
    path: str | os.PathLike[str],
    identity: IdentitySpec | None = None,
    *,
    trusted_signers: Sequence[str] | None = None,
    dek_cache: dict[bytes, bytearray] | None = None,
) -> SealedBundle:
    art = open_artifact(path, identity, trusted_signers=trusted_signers, dek_cache=dek_cache)
    if not isinstance(art, SealedBundle):
        art.close()
        raise UsageError(f"{path} is sealed safetensors, not a bundle: use modelseal.safe_open")
    return art


def read_bytes(
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> bytearray:
    """The decrypted content of one file of a bundle (the only one if ``name`` is None).

    ``path`` may also be a sealed directory, with ``name`` the file's relative path in it.
    """
    p = Path(path)
    if p.is_dir():
        if name is None:
            raise UsageError(f"{p} is a sealed directory: name the file to read")
        p, name = p / name, None
    b = open_bundle(p, identity, trusted_signers=trusted_signers)
    try:
        return b.read(name)
    finally:
        b.close()


def read_all(
    path: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> dict[str, bytearray]:
    """Decrypt every file of a sealed bundle or sealed directory into memory: {relative name: bytes}.

    The caller owns the buffers and should wipe them (``modelseal.crypto.keys.wipe``) when done.
    """
    from modelseal.format import directory
    from modelseal.load.artifacts import resolve_identity

    path = Path(path)
    ident = resolve_identity(identity)
    if path.is_dir():
        cache: dict[bytes, bytearray] = {}
        out: dict[str, bytearray] = {}
        arts = {}
        try:
            for rel in directory.list_members(path):
                arts[rel] = open_bundle(path / rel, ident, trusted_signers=trusted_signers, dek_cache=cache)
            directory.check_group(path, arts)  # type: ignore[arg-type]
            for rel, art in arts.items():
                out[rel] = art.read()
        finally:
            for a in arts.values():
                a.close()
            directory.wipe_cache(cache)
        return out
    b = open_bundle(path, ident, trusted_signers=trusted_signers)
    try:
        return {name: b.read(name) for name in b.names()}
    finally:
        b.close()
