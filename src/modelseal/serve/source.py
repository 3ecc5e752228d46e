"""The artifact of one model version, opened once per load and shared by every instance built from it.

A sealed file (or each member of a sealed directory) is opened, its header parsed, its data key unwrapped
with the server's identity and its signature checked *once*; each instance then decrypts what it needs
from the open artifact into buffers it owns and wipes. Before this, every instance (and the key-id
lookup) opened the file, parsed its header and resolved the identity again: one sealed ONNX model with
two instances opened it 6 times and asked the agent for its key twice.

A plain (unsealed) artifact is only named: its runtime loads it from the path the framework's usual way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelseal.errors import FormatError, UsageError
from modelseal.format import directory
from modelseal.format.bundle import SealedBundle, is_bundle
from modelseal.format.container import Artifact
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.artifacts import key_ids, open_locked
from modelseal.recipients.base import Identity


class ModelSource:
    """``path`` and, when it is sealed, its unlocked artifacts by relative name (``""`` for a single file).

    Open with :meth:`open`, then :meth:`unlock` a sealed one; use as a context manager or call
    :meth:`close`: closing wipes every data key."""

    def __init__(self, path: Path, artifacts: dict[str, Artifact]) -> None:
        self.path = path
        self.artifacts = artifacts

    @property
    def sealed(self) -> bool:
        return bool(self.artifacts)

    @classmethod
    def open(cls, path: Path) -> ModelSource:
        """Open ``path``: when sealed, each file once, its header parsed and checked (no key needed yet)."""
        return cls(path, cls._open_locked(path))

    def unlock(self, identity: Identity, trusted_signers: list[str] | None = None) -> None:
        """Unwrap the data key with ``identity`` (one unwrap for a whole sealed directory: its members share
        it) and authenticate the headers; with ``trusted_signers``, require a trusted publisher's signature;
        a sealed directory's members must be the ones it was sealed with, at their sealed paths."""
        cache: dict[bytes, bytearray] = {}
        try:
            for art in self.artifacts.values():
                art.unlock(identity, cache)
        finally:
            directory.wipe_cache(cache)  # each artifact keeps its own copy, which close() wipes
        if trusted_signers:
            for art in self.artifacts.values():
                art.verify_signature(list(trusted_signers))
        if self.path.is_dir():
            directory.check_group(self.path, self.artifacts)

    @staticmethod
    def _open_locked(path: Path) -> dict[str, Artifact]:
        """The sealed artifacts at ``path`` with their headers parsed, or {} when it is not sealed."""
        if path.is_dir():
            if not any(is_bundle(p) for p in path.rglob("*") if p.is_file()):
                return {}
            found: dict[str, Artifact] = {}
            try:
                for rel in directory.list_members(path):
                    found[rel] = open_locked(path / rel)
            except BaseException:
                for art in found.values():
                    art.close()
                raise
            return found
        try:
            return {"": open_locked(path)}
        except FormatError:
            if is_bundle(path):
                raise  # a damaged sealed bundle: say what is wrong with it
            return {}  # a plain model file (or plain safetensors)

    def key_ids(self) -> set[str]:
        """Key-service key ids the artifact is wrapped to (the agent reports which keys it still holds)."""
        return set().union(*(key_ids(a) for a in self.artifacts.values()))

    def files(self) -> dict[str, bytearray]:
        """Every file of the sealed bundle (or of every bundle of the sealed directory), decrypted into
        new buffers, by relative name. The caller owns them and wipes them (``crypto.keys.wipe``)."""
        out: dict[str, bytearray] = {}
        try:
            for rel, art in self.artifacts.items():
                if not isinstance(art, SealedBundle):
                    raise UsageError(f"{art.path} is sealed safetensors, not a bundle: use modelseal.safe_open")
                if rel:  # a member of a sealed directory: a bundle of that one file
                    out[rel] = art.read()
                else:
                    out.update((name, art.read(name)) for name in art.names())
        except BaseException:
            from modelseal.crypto.keys import wipe

            for data in out.values():
                wipe(data)
            raise
        return out

    def safetensors(self) -> SealedSafetensors:
        """The unlocked sealed safetensors file (a state dict)."""
        art = self.artifacts.get("")
        if not isinstance(art, SealedSafetensors):
            raise UsageError(f"{self.path} is not a sealed safetensors file")
        return art

    def close(self) -> None:
        for art in self.artifacts.values():
            art.close()
        self.artifacts = {}

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
