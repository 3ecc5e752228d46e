"""Hugging Face model directories sealed with ``modelseal seal DIR``, as LLM engines consume them.

``modelseal seal DIR`` seals every file. :func:`open_model_dir` opens such a directory: every sealed
member is unlocked with one identity (one key release for the whole directory) and checked as the group
it was sealed as. A plain file in it (a sealed file swapped for a plain one, or a file added after
sealing, such as a config or chat template written beside the sealed ones) is refused unless the host
passes ``allow_plain``, which also admits plain weights and wholly plain models.
:func:`stage` puts the non-weight files where an engine can open them by name: sealed ones decrypted
into a private RAM directory (:mod:`modelseal.load.memdir`), plain ones linked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import AuthenticationError, NotSealedError, UsageError
from modelseal.format import directory
from modelseal.format.bundle import SealedBundle
from modelseal.format.container import Artifact
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.artifacts import members, open_locked, resolve_identity
from modelseal.load.memdir import MemoryDir
from modelseal.load.remote import display, is_remote
from modelseal.recipients.base import Identity
from modelseal.recipients.registry import IdentitySpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".tensors")


def is_weight_file(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def natural_key(name: str) -> list[object]:
    """``model-2-of-10`` before ``model-10-of-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class ModelDir:
    """An opened model directory: its unlocked sealed members and the files left plain."""

    root: Any  # the local Path, or the URL (str) of a remote directory (load/remote/tree.py), wholly sealed
    sealed: dict[str, Artifact]
    plain: list[str] = field(default_factory=list)

    @property
    def shards(self) -> list[SealedSafetensors]:
        """The sealed weight shards, in natural order of their names."""
        found = [(rel, a) for rel, a in self.sealed.items() if isinstance(a, SealedSafetensors)]
        return [a for _rel, a in sorted(found, key=lambda item: natural_key(item[0]))]

    @property
    def files(self) -> dict[str, SealedBundle]:
        """The sealed non-weight files (config, tokenizer, ...), by relative path."""
        return {rel: a for rel, a in self.sealed.items() if isinstance(a, SealedBundle)}

    def keyserver_keys(self) -> set[tuple[str, str]]:
        """(key id, model) of every key-service stanza: what a lease watchdog asks the agent about."""
        found = set()
        for art in self.sealed.values():
            for stanza in art.envelope.recipients:
                if stanza.get("type") == "keyserver" and isinstance(stanza.get("key_id"), str):
                    found.add((str(stanza["key_id"]), str(stanza.get("model"))))
        return found


def identity_for(spec: IdentitySpec | None, allow_plain: bool) -> Identity | None:
    """The identity to open a model directory with, resolved once; None for a plain model that was
    explicitly allowed and named no identity (a sealed file in it then asks for one, saying none was given)."""
    try:
        return resolve_identity(spec)
    except UsageError:
        if allow_plain and spec is None:
            return None
        raise


@contextmanager
def open_model_dir(
    root: str | os.PathLike[str],
    identity: IdentitySpec | None = None,
    *,
    trusted_signers: Sequence[str] | None = None,
    allow_plain: bool = False,
) -> Iterator[ModelDir]:
    """Open a (wholly or partly) sealed model directory; see the module docstring. Every artifact is
    closed and the shared key cache wiped on exit. ``root`` may be a URL prefix (``s3://bucket/model/``,
    ``https://host/model/``; see docs/remote.md): every file there must be sealed."""
    listed = members(root)
    if listed is None:
        raise UsageError(f"{display(str(root)) if is_remote(root) else root} is not a directory")
    root = str(root) if is_remote(root) else Path(root)
    locked: dict[str, Artifact] = {}
    plain: list[str] = []
    cache: dict[bytes, bytearray] = {}
    remote = isinstance(root, str)
    shown = display(root) if isinstance(root, str) else root

    resolved: Identity | None = None  # at the first sealed member

    def unlock(art: Artifact) -> None:
        nonlocal resolved
        resolved = resolved or resolve_identity(identity)
        art.unlock(resolved, cache)
        if trusted_signers:
            art.verify_signature(list(trusted_signers))

    try:
        for rel, location in listed:
            try:
                art = locked[rel] = open_locked(location)
            except NotSealedError:
                plain.append(rel)
                continue
            if remote:  # authenticated before the next is opened: the member list a server sent (from an
                unlock(art)  # unauthenticated header) costs one header read per genuine member, not one per name
        if plain and remote:
            raise UsageError(f"{shown} holds plain files ({', '.join(plain[:3])}): a remote model must be wholly "
                             "sealed")  # fmt: skip
        _check_plain(root, plain, locked, allow_plain)
        if locked:
            if not remote:
                for art in locked.values():
                    unlock(art)
            directory.check_group(shown, locked, {rel for rel, _loc in listed})
        yield ModelDir(root, locked, plain)
    finally:
        for art in locked.values():
            art.close()
        directory.wipe_cache(cache)


def _check_plain(root: Path | str, plain: list[str], sealed: dict[str, Artifact], allow_plain: bool) -> None:
    """Plain files are refused unless the host allowed them: a plain file where the sealed member list
    names a sealed one is a swap, and any other plain file is one the owner did not seal (sealing a
    directory seals every file), e.g. a config or chat template written beside the sealed ones."""
    if allow_plain or not plain:
        return
    if not sealed:
        raise UsageError(
            f"{root} holds no sealed file: plain models are refused here unless explicitly allowed "
            "(allow_plain); seal it with `modelseal seal`"
        )
    weights = [rel for rel in plain if is_weight_file(rel)]
    if weights:
        raise UsageError(
            f"{root} holds plain weight files ({', '.join(weights[:3])}): refused unless explicitly allowed "
            "(allow_plain); every weight file of a sealed model must be sealed"
        )
    listed: set[str] = set()
    for art in sealed.values():
        group = art.envelope.protected.get(directory.MARKER_KEY)
        if isinstance(group, dict) and isinstance(group.get("members"), list):
            listed |= {m for m in group["members"] if isinstance(m, str)}
    swapped = [rel for rel in plain if rel in listed]
    if swapped:
        raise AuthenticationError(f"{root}: {', '.join(swapped[:3])} was sealed but is now a plain file (swapped?)")
    raise UsageError(
        f"{root} holds files the owner did not seal ({', '.join(plain[:3])}): refused unless explicitly "
        "allowed (allow_plain); remove them or seal the directory again"
    )


def stage(model: ModelDir, into: MemoryDir | None = None) -> MemoryDir:
    """The model's non-weight files in a private RAM directory: sealed ones decrypted, plain ones linked.

    The engine reads configuration and tokenizer from there; weights are not staged (nor linked), so
    nothing in that directory can be mistaken for the model's weights.
    """
    code = [rel for rel in model.files if rel.endswith(".py")]
    if code:
        raise UsageError(
            f"{model.root} holds sealed Python files ({', '.join(code[:3])}): custom model code is not supported, "
            "as transformers copies it to ~/.cache/huggingface/modules, on disk"
        )
    out = into or MemoryDir()
    try:
        for rel, bundle in model.files.items():
            data = bundle.read()
            try:
                out.write(rel, data)
            finally:
                keys.wipe(data)
        for rel in model.plain:
            if not is_weight_file(rel):
                out.link(rel, model.root / rel)
    except BaseException:
        out.close()
        raise
    return out
