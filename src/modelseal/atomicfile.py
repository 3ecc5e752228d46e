"""The one way modelseal writes a file or a directory of files: atomically, privately, leaving nothing.

Plaintext weights and secret keys must never be left half-written, world-readable, or written through
a link someone planted. Every output therefore goes through :func:`write_file` (one file) or
:func:`directory` (a tree of files, all or nothing):

* the data is written to a temporary name created in the target's own directory with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 (so it can be neither pre-planted nor read by others
  while it is written), given its final mode, fsync'd, renamed into place, and the directory fsync'd;
* a symbolic link, a directory or any other non-regular file at the target is refused: renaming
  replaces the link itself, never its target, but a planted link is a sign of an attack;
* without ``overwrite`` an existing target is refused, and the refusal is race-free (``link`` for a
  file, ``rename`` onto nothing or an empty directory for a directory);
* a directory output is built inside a temporary sibling directory that is renamed into place only
  once every file in it is complete, so a failure at the last file removes the first ones too;
* on any exception, and on SIGINT, SIGTERM, SIGHUP or any other catchable signal that would end the
  process while a write is in progress, every temporary file and directory is removed before the process
  goes on (SIGINT raises ``KeyboardInterrupt`` as usual) or dies of the signal with its conventional exit
  status (SIGTERM: 143 from a shell). SIGKILL cannot be caught: its leftovers are ``.*.partial`` names,
  mode 0600.

The one write that is not a rename, :func:`overwrite_at`, changes bytes inside an existing file in
place (rekey's header, rewritten in the space reserved for it), never creating, truncating or
extending it.

Errors from the operating system (full disk, no permission, missing parent) become a one-line
:class:`WriteError` naming the path.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from modelseal.errors import ModelsealError, UsageError

PRIVATE = 0o600  # plaintext weights and secret keys
PRIVATE_DIR = 0o700
TEMP_SUFFIX = ".partial"  # every temporary name ends with this (tests look for strays by it)
_NAME_KEEP = 180  # room for ".<name>.<token>.partial" within NAME_MAX (255)


class WriteError(ModelsealError):
    """An output could not be written (disk full, no permission, missing directory...)."""


def default_mode(directory: bool = False) -> int:
    """``0o666`` (files) or ``0o777`` (directories) minus the process umask: for non-secret outputs."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):  # pragma: no cover - not Linux
        pass
    return 0o022


# ------------------------------------------------------------------------------- cleanup on signals

_live: dict[int, Callable[[], None]] = {}  # token -> removes one temporary file or directory
_ids = itertools.count()
_saved: dict[int, Any] = {}  # signal number -> the handler we replaced, while ours is installed
# Every catchable signal whose default action ends the process: a dropped ssh session (SIGHUP) or a
# stray SIGUSR1 must not leave plaintext behind any more than Ctrl-C. (SIGKILL cannot be caught; SIGPIPE
# and SIGXFSZ are ignored by Python, so writes fail with an error that cleans up instead.)
_GUARDED = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
                 "SIGPROF", "SIGXCPU")
    if hasattr(signal, name)
)


def _cleanup_all() -> None:
    for cleanup in list(_live.values()):
        with contextlib.suppress(OSError):
            cleanup()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Remove every temporary output, then let the signal do what it would have done."""
    previous = _saved.get(signum, signal.SIG_DFL)
    if callable(previous):  # e.g. Python's SIGINT handler, which raises KeyboardInterrupt
        try:
            previous(signum, frame)
        except BaseException:
            _cleanup_all()
            raise
        return  # the process chose to carry on: so does the write
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of the signal, as without us
    raise SystemExit(128 + signum)  # pragma: no cover - only if the signal did not kill us


def _install() -> bool:
    """Install the cleanup handlers (main thread only, outermost write only); True if installed."""
    if _saved or threading.current_thread() is not threading.main_thread():
        return False
    for signum in _GUARDED:
        previous = signal.getsignal(signum)
        if previous in (signal.SIG_IGN, None):  # ignored (or set outside Python): leave it alone
            continue
        _saved[signum] = previous
        signal.signal(signum, _on_signal)
    return bool(_saved)


def _restore() -> None:
    for signum, previous in list(_saved.items()):
        signal.signal(signum, previous)
    _saved.clear()


@contextlib.contextmanager
def _tracked(cleanup: Callable[[], None]) -> Iterator[None]:
    """Register ``cleanup`` for the signal handler while the body runs."""
    token = next(_ids)
    _live[token] = cleanup
    installed = _install()
    try:
        yield
    finally:
        _live.pop(token, None)
        if installed:
            _restore()


# ----------------------------------------------------------------------------------------- helpers


def _temp_name(name: str, kind: str = "") -> str:
    return f".{name[:_NAME_KEEP]}.{secrets.token_hex(6)}{kind}{TEMP_SUFFIX}"


@contextlib.contextmanager
def _parent(path: Path) -> Iterator[int]:
    """An fd of ``path``'s directory (all later steps are relative to it, so they cannot be redirected)."""
    if path.name in ("", ".", ".."):
        raise UsageError(f"{path} does not name a file or directory to create")
    parent = path.parent
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"cannot write {path}: the directory {parent} does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"cannot write {path}: {parent} is not a directory") from None
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {parent}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _existing(path: Path, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def check_apart(source: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Refuse an output that is its input, lies inside it, or contains it.

    Replacing an ancestor of the input with ``--force`` deletes the input (the plaintext being sealed,
    or the sealed model being opened); writing inside a directory that is being read reads the output
    back in.
    """
    src, out = Path(source).resolve(), Path(output).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise UsageError(f"{output}: the output must lie outside the input {source}, and must not contain it")


def check_target(path: str | os.PathLike[str], *, want_dir: bool = False, overwrite: bool = False) -> None:
    """Fail early, before any costly work, where :func:`write_file` or :func:`directory` would refuse."""
    path = Path(path)
    with _parent(path) as dir_fd:
        _check_target(path, dir_fd, want_dir, overwrite)


def _check_target(path: Path, dir_fd: int, want_dir: bool, overwrite: bool) -> None:
    """Refuse links and other file types at the target, and an existing target without ``overwrite``."""
    st = _existing(path, dir_fd)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{path} is a symbolic link; refusing to write through or replace it (remove it first)")
    if want_dir and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} exists and is not a directory")
    if not want_dir and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UsageError(f"{path} is {kind}; give the path of a file to write")
    if overwrite or (want_dir and _is_empty(path)):  # an empty directory may receive a new tree
        return
    raise UsageError(f"{path} exists; pass --force to overwrite it")


def _is_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _os_error(path: Path, exc: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {exc.strerror or exc}")


def _unlink(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _fsync_dir(dir_fd: int) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory; the rename stands
        os.fsync(dir_fd)


# -------------------------------------------------------------------------------------- one file


def write_file(
    path: str | os.PathLike[str], mode: int, fill: Callable[[int], None], *, overwrite: bool = False
) -> Path:
    """Create ``path`` atomically with ``fill(fd)`` writing its contents, then give it ``mode``.

    ``fill`` gets a write-only fd positioned at 0 (``os.write`` and ``os.pwrite`` both work). The file
    appears complete, fsync'd and with its final mode, or not at all (see the module docstring).
    """
    path = Path(path)
    with _parent(path) as dir_fd:
        _check_target(path, dir_fd, want_dir=False, overwrite=overwrite)
        tmp = _temp_name(path.name)
        with _tracked(lambda: _unlink(tmp, dir_fd)):
            try:
                _write_temp(path, tmp, dir_fd, mode, fill)
                _commit_file(path, tmp, dir_fd, overwrite)
            except BaseException:
                _unlink(tmp, dir_fd)
                raise
            _fsync_dir(dir_fd)
    return path


def _write_temp(path: Path, tmp: str, dir_fd: int, mode: int, fill: Callable[[int], None]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, PRIVATE, dir_fd=dir_fd)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        fill(fd)
        os.fchmod(fd, mode & 0o7777)
        os.fsync(fd)
    except OSError as exc:
        raise _os_error(path, exc) from None
    finally:
        os.close(fd)


def _commit_file(path: Path, tmp: str, dir_fd: int, overwrite: bool) -> None:
    """Move the finished temporary file to ``path`` (no-clobber unless ``overwrite``)."""
    try:
        if overwrite:
            _check_target(path, dir_fd, want_dir=False, overwrite=True)  # again: it may have changed
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        try:
            os.link(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise UsageError(f"{path} exists; pass --force to overwrite it") from None
        except OSError:  # a file system without hard links: check, then rename
            _check_target(path, dir_fd, want_dir=False, overwrite=False)
            os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        _unlink(tmp, dir_fd)
    except OSError as exc:
        raise _os_error(path, exc) from None


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (a write near a size limit may be short)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written at ``offset``."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Writeback:
    """Writes a file's pages to disk while it is still being filled, and keeps few of them in memory.

    The writer calls :meth:`written` after each ``pwrite`` (from any thread, in any order). Once every byte
    of a window of :data:`WRITEBACK_WINDOW` bytes is in, its pages are handed to the disk
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: starts the I/O, returns). Once more than
    :data:`WRITEBACK_DEPTH` windows are on their way, the oldest is waited for and dropped from the page
    cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, on clean pages only a cache hint). So:

    * disk writes overlap the encryption of the next windows, and the final ``fsync`` finds almost nothing
      left to write;
    * the output holds a few windows of page cache whatever its size, and those pages are recycled for
      the next windows. Fresh page-cache pages are what a big buffered write spends its time on here
      (each one costs the VM a first touch, and gigabytes of them get the writer throttled): writing
      1 GiB took 2-4 s in that mode against 0.5-1 s recycling (docs/benchmarks.md, "Sealing throughput").

    The cost: a file just written is not in the page cache, so reading it right away reads the disk.
    Only hints: where ``sync_file_range`` does not exist (not Linux) or fails, nothing happens and the
    caller's ``fsync`` does all the work, as before.
    """

    def __init__(self, fd: int, start: int, size: int, window: int = 0, depth: int = 0) -> None:
        self._fd, self._end = fd, start + size
        # windows lie at multiples of their size in the file, so no page straddles two: a page still being
        # filled is never handed to the disk (a write into a page under writeback may wait for the I/O)
        self._window = w = window or WRITEBACK_WINDOW
        self._depth = depth or WRITEBACK_DEPTH
        self._first = start // w
        self._left = [min(self._end, (i + 1) * w) - max(start, i * w) for i in range(self._first, -(-self._end // w))]
        self._started: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()
        self._sync = _sync_file_range()

    def written(self, offset: int, length: int) -> None:
        """Record that ``[offset, offset + length)`` was written; start the disk writes of completed windows."""
        if self._sync is None or length <= 0:
            return
        end, w = offset + length, self._window
        done, old = [], []
        with self._lock:
            for i in range(offset // w, (end - 1) // w + 1):
                self._left[i - self._first] -= min(end, (i + 1) * w) - max(offset, i * w)
                if self._left[i - self._first] == 0:
                    done.append(i * w)
                    self._started.append(i * w)
            while len(self._started) > self._depth:
                old.append(self._started.popleft())
        # outside the lock: these wait for the device (that is the back-pressure that bounds memory)
        for begin in done:
            self._sync(self._fd, begin, w, _SYNC_FILE_RANGE_WRITE)
        for begin in old:
            self._sync(self._fd, begin, w, _SYNC_FILE_RANGE_WAIT)
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, begin, w, os.POSIX_FADV_DONTNEED)


WRITEBACK_WINDOW = 8 << 20
WRITEBACK_DEPTH = 4
# <linux/fs.h>; os has no sync_file_range, so libc's is called through ctypes (which releases the GIL)
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER: the range is on disk when it returns
_libc_sync: list[Any] = []


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or None where there is none (or no ``posix_fadvise``)."""
    if not _libc_sync:
        fn = None
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            fn.restype = ctypes.c_int
        except (ImportError, OSError, AttributeError):  # no ctypes, no libc, or not Linux
            fn = None
        _libc_sync.append(fn if hasattr(os, "posix_fadvise") else None)
    sync: Callable[[int, int, int, int], int] | None = _libc_sync[0]
    return sync


def overwrite_at(
    path: str | os.PathLike[str], offset: int, data: bytes | bytearray | memoryview, *, same_as: int | None = None
) -> None:
    """Overwrite bytes of an existing regular file in place at ``offset``, then fsync it.

    The one write that is not atomic by rename, for a change that must not copy the file: rekey
    rewriting a header inside the space reserved for it (a few KiB in front of gigabytes of
    ciphertext that stay where they are). It never creates, truncates or extends the file; a crash
    in the middle can tear the header, which is why rekey is idempotent and is simply run again. A
    symbolic link at ``path`` is refused, as everywhere else.

    ``same_as`` is the descriptor of the file the caller opened and checked at ``path``: the path is
    reopened (without following a link and without blocking, so a FIFO put there cannot hang the
    write) and the write is refused unless it still names that very file, so a hard link to another
    file swapped in meanwhile is never written through.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symbolic link; refusing to write through it") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads, or a socket: not the file that was opened
            raise WriteError(f"{path} is no longer a regular file; refusing to write into it") from None
        raise _os_error(path, exc) from None
    try:
        found = os.fstat(fd)
        if same_as is not None:
            opened = os.fstat(same_as)
            if (found.st_dev, found.st_ino) != (opened.st_dev, opened.st_ino):
                raise WriteError(f"{path} was replaced since it was opened; refusing to write into the new file")
        if not stat.S_ISREG(found.st_mode) or offset + len(data) > found.st_size:
            raise UsageError(f"{path}: only bytes inside an existing regular file are overwritten in place")
        pwrite_all(fd, data, offset)
        os.fsync(fd)
    except OSError as exc:
        raise _os_error(path, exc) from None
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int, *, overwrite: bool = False) -> Path:
    """:func:`write_file` for data already in memory (key files, small documents)."""
    return write_file(path, mode, lambda fd: write_all(fd, data), overwrite=overwrite)


# ------------------------------------------------------------------------------- a directory tree


@contextlib.contextmanager
def directory(path: str | os.PathLike[str], mode: int = PRIVATE_DIR, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory tree all or nothing: yields a temporary sibling to fill, renamed to ``path`` after.

    Write the files inside with :func:`write_file` (``overwrite=False``: the directory is new). An
    existing empty directory is replaced without ``overwrite``; a non-empty one only with it (its old
    contents are removed after the new tree is in place). On any failure the temporary tree goes.
    """
    path = Path(path)
    with _parent(path) as dir_fd:
        _check_target(path, dir_fd, want_dir=True, overwrite=overwrite)
        tmp = _temp_name(path.name)
        with _tracked(lambda: _rmtree(tmp, dir_fd)):
            try:
                os.mkdir(tmp, PRIVATE_DIR, dir_fd=dir_fd)
            except OSError as exc:
                raise _os_error(path, exc) from None
            try:
                yield path.parent / tmp
                _fsync_tree(path.parent / tmp)
                os.chmod(tmp, mode & 0o7777, dir_fd=dir_fd)
                _commit_dir(path, tmp, dir_fd, overwrite)
            except BaseException:
                _rmtree(tmp, dir_fd)
                raise
            _fsync_dir(dir_fd)


def _commit_dir(path: Path, tmp: str, dir_fd: int, overwrite: bool) -> None:
    """Rename the finished tree to ``path``; a non-empty old directory is moved aside, then removed."""
    _check_target(path, dir_fd, want_dir=True, overwrite=overwrite)
    try:
        os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # onto nothing or an empty dir
        return
    except OSError as exc:
        occupied = exc.errno in (errno.ENOTEMPTY, errno.EEXIST)
        if occupied and not overwrite:  # something appeared since the check
            raise UsageError(f"{path} exists; pass --force to overwrite it") from None
        if not occupied:
            raise _os_error(path, exc) from None
    old = _temp_name(path.name, ".old")

    def put_back() -> None:  # the old tree returns if the new one did not make it into place
        if _existing(path, dir_fd) is None:
            os.rename(old, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            _rmtree(old, dir_fd)

    with _tracked(put_back):
        try:
            os.rename(path.name, old, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            put_back()
            raise _os_error(path, exc) from None
        except BaseException:
            put_back()
            raise
        _rmtree(old, dir_fd)


def _rmtree(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(name, dir_fd=dir_fd)


def _fsync_tree(root: Path) -> None:
    """fsync every directory of a finished tree (the files were fsync'd as they were written)."""
    for dirpath, _dirs, _files in os.walk(root):
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _fsync_dir(fd)
        finally:
            os.close(fd)
