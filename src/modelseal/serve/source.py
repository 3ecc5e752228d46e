"""The artifact of one model version, opened once per load and shared by every instance built from it.

A sealed file (or each member of a sealed directory) is opened, its header parsed, its data key unwrapped
with the server's identity and its signature checked *once*; each instance then decrypts what it needs
from the open artifact into buffers it owns and wipes. Before this, every instance (and the key-id
lookup) opened the file, parsed its header and resolved the identity again: one sealed ONNX model with
two instances opened it 6 times and asked the agent for its key twice.

A plain (unsealed) artifact is only named: its runtime loads it from the path the framework's usual way.

A model file may also live in object storage or on an HTTP server: the version directory then holds, under
the model file's usual name (``1/model.onnx.sealed``...), a small *pointer file* whose first line is
``modelseal-remote: URL`` (``s3://bucket/key``, ``https://...``, ``http://...``; a URL ending in ``/`` is a
sealed directory). The artifact is read from there by ranges (``load/remote``), never copied to disk, and
must be sealed. docs/remote.md has the details.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from modelseal.crypto.keys import wipe
from modelseal.errors import FormatError, UsageError
from modelseal.format import directory
from modelseal.format.bundle import SealedBundle, is_bundle
from modelseal.format.container import Artifact
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.artifacts import key_ids, open_locked, open_sealed_dir
from modelseal.load.remote import is_remote
from modelseal.load.remote.tree import is_remote_dir
from modelseal.recipients.base import Identity

POINTER = b"modelseal-remote:"
MAX_POINTER = 4096  # a pointer is one line; a model file is never mistaken for one


class ModelSource:
    """``path`` and, when it is sealed, its unlocked artifacts by relative name (one for a sealed file).
    Made by :func:`open_source`, valid inside its ``with`` block."""

    def __init__(self, path: Path, artifacts: dict[str, Artifact], directory: bool) -> None:
        self.path = path
        self.artifacts = artifacts
        self._directory = directory

    @property
    def sealed(self) -> bool:
        return bool(self.artifacts)

    @property
    def directory(self) -> bool:
        """Whether the artifacts are the members of a sealed directory, local or remote (``path`` is then a
        pointer file for a remote one: ``path.is_dir()`` does not say)."""
        return self._directory

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
                if self._directory:  # a member of a sealed directory: a bundle of that one file
                    out[rel] = art.read()
                else:
                    out.update((name, art.read(name)) for name in art.names())
        except BaseException:
            for data in out.values():
                wipe(data)
            raise
        return out

    def safetensors(self) -> SealedSafetensors:
        """The unlocked sealed safetensors file (a state dict)."""
        arts = list(self.artifacts.values())
        if self._directory or len(arts) != 1 or not isinstance(arts[0], SealedSafetensors):
            raise UsageError(f"{self.path} is not a sealed safetensors file")
        return arts[0]


@contextlib.contextmanager
def open_source(
    path: Path, identity: Callable[[], Identity], trusted_signers: list[str] | None = None
) -> Iterator[ModelSource]:
    """``path`` opened once: when sealed, each file's header parsed and its data key unwrapped with
    ``identity()`` (asked only then: a plain artifact needs none; one unwrap for a whole sealed directory),
    with ``trusted_signers`` a trusted publisher's signature required, and a sealed directory's members
    checked to be the ones it was sealed with. On exit every artifact is closed and its data key wiped."""

    def unlocked(art: Artifact, cache: dict[bytes, bytearray]) -> Artifact:
        try:
            art.unlock(identity(), cache)
            if trusted_signers:
                art.verify_signature(list(trusted_signers))
        except BaseException:
            art.close()
            raise
        return art

    url = remote_target(path)
    if url is not None:
        if is_remote_dir(url):
            with open_sealed_dir(url, lambda member, cache: unlocked(open_locked(member), cache)) as arts:
                yield ModelSource(path, dict(arts), directory=True)
            return
        art = open_locked(url)
        name = url.rstrip("/").rsplit("/", 1)[-1]
        one = directory.open_directory(url, lambda _member, cache: unlocked(art, cache),
                                       members=[name], locate=lambda _rel: url, check=False)  # fmt: skip
        with one as arts:
            yield ModelSource(path, dict(arts), directory=False)
        return
    if path.is_dir():
        members = list(path.rglob("*"))
        for member in members:
            _refuse_special(member)
        if not any(is_bundle(p) for p in members if p.is_file()):
            yield ModelSource(path, {}, directory=True)
            return
        with directory.open_directory(path, lambda member, cache: unlocked(open_locked(member), cache)) as arts:
            yield ModelSource(path, dict(arts), directory=True)
        return
    try:
        art = open_locked(path)
    except FormatError:
        if is_bundle(path):
            raise  # a damaged sealed bundle: say what is wrong with it
        _refuse_special(path)  # its runtime would block opening a FIFO
        yield ModelSource(path, {}, directory=False)  # a plain model file (or plain safetensors)
        return
    # one sealed file goes through the same open-close-wipe path as a directory's members (unlocked()
    # closes it if unlocking fails, before open_directory holds it)
    single = directory.open_directory(path.parent, lambda _member, cache: unlocked(art, cache),
                                      members=[path.name], check=False)  # fmt: skip
    with single as arts:
        yield ModelSource(path, dict(arts), directory=False)


def remote_target(path: Path) -> str | None:
    """The URL a pointer file at ``path`` names (see the module docstring); None for any other path."""
    try:
        if not stat.S_ISREG(path.stat().st_mode) or path.stat().st_size > MAX_POINTER:
            return None
        with path.open("rb") as f:
            head = f.read(MAX_POINTER)
    except OSError:
        return None  # the open that follows says what is wrong
    if not head.startswith(POINTER):
        return None
    url = head[len(POINTER) :].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if not is_remote(url):
        raise UsageError(f"{path}: a modelseal-remote pointer must name an s3://, https:// or http:// URL")
    return url


def _refuse_special(path: Path) -> None:
    """Refuse ``path`` unless it is a regular file or a directory (``stat``, which never blocks).

    A FIFO (or device) named as a model, or inside a model's directory, would hang the load thread for good
    in the runtime's blocking open -- holding the model's lock, and every later model and the shutdown
    behind it; instead it is that model's load-failure reason."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # gone or unreadable: the open that follows says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FormatError(f"{path} is not a regular file (a FIFO or device cannot be a model file)")
