"""Open any sealed file: detect its kind, unlock it with an identity, optionally check its signer.

Also the one place that turns an identity spec (an argument, ``$MODELSEAL_IDENTITY``,
``$MODELSEAL_AGENT_SOCKET``) into an :class:`Identity`: every loader, the CLI and serve call
:func:`resolve_identity`, once per use, and pass the resolved object on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from modelseal.errors import UsageError
from modelseal.format.bundle import MAGIC as BUNDLE_MAGIC
from modelseal.format.bundle import SealedBundle
from modelseal.format.container import Artifact, ByteSource, Progress, map_file
from modelseal.format.directory import MemberOpener, list_members, open_directory
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.remote import display, is_remote
from modelseal.recipients.base import Identity
from modelseal.recipients.registry import IdentitySpec, load_identity

A = TypeVar("A", bound=Artifact)
IDENTITY_ENV = "MODELSEAL_IDENTITY"
AGENT_SOCKET_ENV = "MODELSEAL_AGENT_SOCKET"


def resolve_identity(identity: IdentitySpec | None) -> Identity:
    """``identity`` as given, else ``$MODELSEAL_IDENTITY``, else the agent at ``$MODELSEAL_AGENT_SOCKET``.

    ``$MODELSEAL_IDENTITY`` holds any identity spec (a key-file path, ``env:VAR``, ``passphrase-env:VAR``,
    ``agent:SOCKET``) or identity text itself; errors name the variable, never its value. An
    :class:`Identity` is returned as it is, so resolving once and passing the result costs nothing more:
    key files are read, variables looked up and agents addressed once per use, not once per file.
    """
    if isinstance(identity, Identity):
        return identity
    if identity is not None:
        return load_identity(identity)
    if os.environ.get(IDENTITY_ENV):
        return load_identity(os.environ[IDENTITY_ENV], origin=f"${IDENTITY_ENV}")
    if os.environ.get(AGENT_SOCKET_ENV):
        return load_identity(f"agent:{os.environ[AGENT_SOCKET_ENV]}")
    raise UsageError(
        f"no identity given: pass identity=... (-i on the command line), or set {IDENTITY_ENV} or {AGENT_SOCKET_ENV}"
    )


def open_source(path: str | os.PathLike[str]) -> ByteSource:
    """A local file (mapped) or, for ``s3://``, ``https://`` and ``http://`` strings, a remote object
    (``load/remote``: its header read into memory, its payload by ranges)."""
    if is_remote(path):
        from modelseal.load.remote.source import RemoteSource  # imported only for a URL

        return RemoteSource(str(path))
    return map_file(path)  # refuses FIFOs, devices and directories without blocking on them


def open_locked(path: str | os.PathLike[str]) -> Artifact:
    """Open a sealed file without a key (header only): one open, whose first bytes choose the reader."""
    src = open_source(path)
    if src.region(0, 8) == BUNDLE_MAGIC:
        return SealedBundle.from_source(src)
    return SealedSafetensors.from_source(src)


def members(path: str | os.PathLike[str]) -> list[tuple[str, str | Path]] | None:
    """The (relative name, location) of every file of a sealed directory, local or remote; None when
    ``path`` is a single file (or does not exist: opening it says so)."""
    if is_remote(path):
        from modelseal.load.remote.tree import is_remote_dir, open_tree

        if not is_remote_dir(str(path)):
            return None
        tree = open_tree(str(path))
        return [(rel, tree.locate(rel)) for rel in tree.members]
    p = Path(path)
    return [(rel, p / rel) for rel in list_members(p)] if p.is_dir() else None


@contextmanager
def open_sealed_dir(path: str | os.PathLike[str], open_member: MemberOpener[A]) -> Iterator[dict[str, A]]:
    """:func:`~modelseal.format.directory.open_directory` for a local directory or a URL prefix: every
    member opened with ``open_member(location, cache)`` and checked as the group it was sealed as."""
    listed = members(path)
    shown = display(str(path)) if is_remote(path) else path  # a URL's credentials stay out of messages
    if listed is None:
        raise UsageError(f"{shown} is not a directory")
    where = dict(listed)
    with open_directory(
        shown if is_remote(path) else Path(path),  # for a URL only named in messages: members are located
        open_member,
        members=list(where),
        locate=where.__getitem__,
        present=set(where),
    ) as arts:
        yield arts


def key_ids(artifact: Artifact | str | os.PathLike[str]) -> set[str]:
    """The key-service key ids that a sealed file, bundle or directory (every member) is wrapped to.

    Read from the header's stanzas without any key, hence unauthenticated: good for knowing which
    keys the host agent must hold (serve watches them), not for any decision about trust.
    """
    if isinstance(artifact, Artifact):
        return _stanza_key_ids(artifact)
    listed = members(artifact)
    found: set[str] = set()
    for member in [artifact] if listed is None else [loc for _rel, loc in listed]:
        with open_locked(member) as art:
            found |= _stanza_key_ids(art)
    return found


def _stanza_key_ids(art: Artifact) -> set[str]:
    return {s["key_id"] for s in art.envelope.recipients if isinstance(s.get("key_id"), str)}


def open_artifact(
    path: str | os.PathLike[str],
    identity: IdentitySpec | None = None,
    *,
    trusted_signers: Sequence[str] | None = None,
    dek_cache: dict[bytes, bytearray] | None = None,
    progress: Progress | None = None,
) -> Artifact:
    """Open and unlock a sealed file; with ``trusted_signers`` also require a valid trusted signature."""
    art = open_locked(path)
    try:
        art.unlock(resolve_identity(identity), dek_cache)
        if trusted_signers:
            art.verify_signature(list(trusted_signers), progress)
        return art
    except BaseException:
        art.close()
        raise
