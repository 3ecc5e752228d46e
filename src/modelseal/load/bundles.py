"""Read files out of sealed bundles and sealed directories, into memory only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from modelseal.crypto import keys
from modelseal.errors import UsageError
from modelseal.format.bundle import SealedBundle
from modelseal.load.artifacts import open_artifact, open_sealed_dir, resolve_identity
from modelseal.load.remote import is_remote
from modelseal.load.remote.tree import is_remote_dir
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

    ``path`` may also be a sealed directory, with ``name`` the file's relative path in it, and either may
    be a URL (``s3://``, ``https://``, ``http://``; a directory URL ends with ``/``).
    """
    p: str | Path = str(path) if is_remote(path) else Path(path)
    if (isinstance(p, str) and is_remote_dir(p)) or (isinstance(p, Path) and p.is_dir()):
        if name is None:
            raise UsageError(f"{p} is a sealed directory: name the file to read")
        p, name = (p.partition("#")[0] + quote(name) if isinstance(p, str) else p / name), None
    with open_bundle(p, identity, trusted_signers=trusted_signers) as b:
        return b.read(name)


def read_all(
    path: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> dict[str, bytearray]:
    """Decrypt every file of a sealed bundle or sealed directory into memory: {relative name: bytes}.

    The caller owns the buffers and should wipe them (``modelseal.crypto.keys.wipe``) when done.
    """
    ident = resolve_identity(identity)
    if is_remote_dir(str(path)) if is_remote(path) else Path(path).is_dir():

        def member(p: str | Path, cache: dict[bytes, bytearray]) -> SealedBundle:
            return open_bundle(p, ident, trusted_signers=trusted_signers, dek_cache=cache)

        with open_sealed_dir(path, member) as arts:
            return _read_each([(rel, art, None) for rel, art in arts.items()])
    with open_bundle(path, ident, trusted_signers=trusted_signers) as b:
        return _read_each([(name, b, name) for name in b.names()])


def _read_each(files: list[tuple[str, SealedBundle, str | None]]) -> dict[str, bytearray]:
    """{key: decrypted file}; if one fails, the ones already decrypted are wiped too."""
    out: dict[str, bytearray] = {}
    try:
        for key, art, name in files:
            out[key] = art.read(name)
    except BaseException:
        for buf in out.values():
            keys.wipe(buf)
        raise
    return out
