"""A private, memory-backed directory for the few decrypted files an engine insists on opening by name.

vLLM and transformers read ``config.json``, ``generation_config.json`` and the tokenizer files from a
directory path, in every process they spawn. When the owner sealed those files too, they must exist as
files somewhere, but never on a disk: they go to a fresh ``0700`` directory on a RAM filesystem (``tmpfs``
or ``ramfs``; ``/dev/shm`` unless ``$MODELSEAL_MEMDIR`` names another), each file ``0600``. The directory
is removed when it is closed or the process exits; one left behind by a killed process (still only in
RAM) is removed by the next process that makes one: each owner holds a lock on its directory, which the
kernel drops when the owner (and any process it forked) ends, so a live directory is never swept, even
by a process in another pid namespace sharing ``/dev/shm``. Weights never go
here: they are decrypted straight into the engine's tensors.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from modelseal.errors import UsageError

MEMDIR_ENV = "MODELSEAL_MEMDIR"
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
PREFIX = "modelseal-"
DEFAULT_BASE = "/dev/shm"  # noqa: S108 - private 0700 directories made with mkdtemp, checked to be RAM


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The type of the filesystem ``path`` lives on, from ``/proc/self/mountinfo`` (None if unknown)."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def _try_lock(path: Path) -> int | None:
    """An fd holding ``path``'s exclusive lock, or None when a live process holds it (or it is not ours)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _sweep(base: Path) -> None:
    """Remove this user's directories in ``base`` whose owner is gone: the owner holds a lock on its
    directory for as long as it (or a process it forked) lives, and the kernel drops it when they end."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.name.startswith(PREFIX) or entry.is_symlink() or entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        fd = _try_lock(entry)
        if fd is not None:
            try:
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                os.close(fd)


def _remove(path: str, fd: int) -> None:
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


class MemoryDir:
    """A fresh private directory on a RAM filesystem; see the module docstring."""

    def __init__(self, base: str | os.PathLike[str] | None = None) -> None:
        root = Path(base or os.environ.get(MEMDIR_ENV) or DEFAULT_BASE)
        kind = filesystem_type(root) if root.is_dir() else None
        if kind not in RAM_FILESYSTEMS:
            where = f"${MEMDIR_ENV} ({root})" if os.environ.get(MEMDIR_ENV) and base is None else str(root)
            raise UsageError(
                f"{where} is not a RAM filesystem (found {kind or 'no such directory'}): decrypted configuration "
                f"files may only be written to tmpfs or ramfs; set {MEMDIR_ENV} to a tmpfs directory"
            )
        _sweep(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        fd = _try_lock(self.path)
        if fd is None:
            shutil.rmtree(self.path, ignore_errors=True)
            raise UsageError(f"cannot lock the staging directory {self.path}")
        self._finalizer = weakref.finalize(self, _remove, str(self.path), fd)

    def write(self, relative: str, data: bytes | bytearray | memoryview) -> Path:
        """Write ``data`` to ``relative`` inside the directory (``0600``, never through a link)."""
        target = self._inside(relative)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return target

    def link(self, relative: str, source: Path) -> Path:
        """Make ``relative`` a symbolic link to ``source`` (a file the owner left plain: nothing to hide)."""
        target = self._inside(relative)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.symlink_to(source.resolve())
        return target

    def _inside(self, relative: str) -> Path:
        target = (self.path / relative).resolve()
        if not target.is_relative_to(self.path.resolve()) or target == self.path.resolve():
            raise UsageError(f"{relative!r} is not a path inside the staging directory")
        return target

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> MemoryDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
