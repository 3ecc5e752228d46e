"""Sealed bundle: any file or directory as one segmented AEAD artifact with an encrypted manifest.

Layout::

    b"MSEALBN1" | u64 LE N | envelope JSON (N bytes, space padded) | payload | tags

The payload is the concatenation of the files' ciphertexts; the index (the manifest: relative paths,
offsets, permission bits, empty directories) is always encrypted, so file names do not leak. Sealing
and extraction stream one segment at a time, so a file larger than RAM can be sealed and verified;
any segment can be decrypted on its own (random access).
"""

from __future__ import annotations

import bisect
import json
import os
import stat
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelseal.crypto.segments import DEFAULT_SEGMENT_SIZE
from modelseal.errors import FormatError, UsageError
from modelseal.format import schema
from modelseal.format.container import (
    Artifact,
    ByteSource,
    Destination,
    Entry,
    Progress,
    SealRequest,
    map_file,
    write_artifact,
)
from modelseal.format.envelope import Envelope, EnvelopeBuilder
from modelseal.recipients.base import Recipient

if TYPE_CHECKING:
    from modelseal.crypto.signing import Signer

MAGIC = b"MSEALBN1"
HEADER_ALIGN = 4096
HEADER_SLACK = 4096


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts with the sealed-bundle magic (to choose a reader
    before opening it). Opened without blocking and checked on the descriptor: a FIFO or device is not a
    bundle, and a blocking open of a FIFO would wait for a writer for good."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 8, 0) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _header_bytes(env: Envelope, size: int | None) -> bytes:
    raw = env.to_json().encode()
    if size is None:
        size = -(-(16 + len(raw) + HEADER_SLACK) // HEADER_ALIGN) * HEADER_ALIGN
    if 16 + len(raw) > size:
        raise FormatError("the new header does not fit in the space reserved for it")
    return MAGIC + struct.pack("<Q", size - 16) + raw + b" " * (size - 16 - len(raw))


def _check_tree(files: list[str], dirs: list[str], what: str) -> None:
    """Every path is safe, and no file sits where another path needs a directory (``a`` and ``a/b``)."""
    names = set(files)
    for i, path in enumerate(files + dirs):
        schema.relpath(path, f"{what} path {i}")
        parts = path.split("/")
        parents = ["/".join(parts[:k]) for k in range(1, len(parts))]
        if any(p in names for p in parents) or (i >= len(files) and path in names):
            raise FormatError(f"{what}: {path[:80]!r} collides with a file of the same name")


def collect_files(src: Path) -> tuple[list[tuple[str, Path, int, int]], list[str]]:
    """Files (relative name, path, size, mode) and empty directories under ``src`` (or ``src`` itself)."""
    if src.is_file():
        st = src.stat()
        return [(src.name, src, st.st_size, stat.S_IMODE(st.st_mode))], []
    if not src.is_dir():
        raise UsageError(f"{src} does not exist or is not a regular file or directory")
    files, empty_dirs = [], []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        rel_root = Path(root).relative_to(src)
        if not names and not dirs and rel_root != Path("."):
            empty_dirs.append(rel_root.as_posix())
        for n in sorted(names):
            p = Path(root) / n
            if p.is_symlink() or not p.is_file():
                raise UsageError(f"{p} is a link or special file; bundles hold regular files only")
            st = p.stat()
            files.append(((rel_root / n).as_posix(), p, st.st_size, stat.S_IMODE(st.st_mode)))
    return files, empty_dirs


def seal_path(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | Destination,
    recipients: list[Recipient],
    *,
    builder: EnvelopeBuilder,
    signer: Signer | None = None,
    group: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Envelope:
    """Seal a file or a directory tree into one bundle, streaming, in bounded memory."""
    src = Path(src)
    files, empty_dirs = collect_files(src)
    entries, index_entries, pos = [], [], 0
    for i, (name, _p, size, mode) in enumerate(files):
        entries.append(Entry(i, name, pos, pos + size))
        index_entries.append({"name": name, "offsets": [pos, pos + size], "mode": mode})
        pos += size
    index = {"root": "dir" if src.is_dir() else "file", "entries": index_entries, "dirs": empty_dirs}
    starts = [e.begin for e in entries]
    fds: dict[int, int] = {}
    opening = threading.Lock()  # the sealing workers read in parallel
    buffers = threading.local()  # one read buffer per worker, reused: no new bytes object per segment

    def read_plain(off: int, n: int) -> memoryview:
        i = bisect.bisect_right(starts, off) - 1  # segments never span files; empty files read nothing
        with opening:
            if i not in fds:
                fds[i] = os.open(files[i][1], os.O_RDONLY | os.O_CLOEXEC)
        buf = getattr(buffers, "buf", None)
        if buf is None or len(buf) < n:
            buf = buffers.buf = bytearray(max(n, builder.segment_size))
        view = memoryview(buf)[:n]
        pos = 0
        while pos < n:  # pread, not a mapping: a file cut short while being sealed is an error, not SIGBUS
            got = os.preadv(fds[i], [view[pos:]], off - entries[i].begin + pos)
            if got == 0:
                raise UsageError(f"{files[i][1]} changed size while it was being sealed")
            pos += got
        return view

    try:
        return write_artifact(
            dst,
            SealRequest(builder, entries, index, read_plain, recipients, True, signer, group),
            _header_bytes,
            progress,
        )
    finally:
        for fd in fds.values():
            os.close(fd)


def new_builder(
    model_id: str, model_version: str, dek: bytearray, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> EnvelopeBuilder:
    return EnvelopeBuilder("bundle", model_id, model_version, segment_size, dek)


class SealedBundle(Artifact):
    """A sealed bundle opened for reading."""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SealedBundle:
        return cls.from_source(map_file(path))

    @classmethod
    def from_source(cls, src: ByteSource) -> SealedBundle:
        """The bundle in an opened file or remote object (closed here if it is not one)."""
        path = src.path
        try:
            head = src.region(0, 16)
            if head[:8] != MAGIC:
                raise FormatError(f"{path} is not a sealed modelseal file (no sealed-bundle magic)")
            if len(head) < 16:
                raise FormatError(f"{path} is truncated inside its header")
            (n,) = struct.unpack("<Q", head[8:16])
            if n > schema.MAX_HEADER:  # checked before anything is read: a huge header is refused, not parsed
                raise FormatError(f"{path}: the bundle header is {n} bytes, over the limit of {schema.MAX_HEADER}")
            if 16 + n > src.size:
                raise FormatError(f"{path} is truncated inside its header")
            mm = src.region(0, 16 + n)
            env = Envelope.parse(bytes(mm[16 : 16 + n]).rstrip(b" "), str(path))
            if env.protected["kind"] != "bundle":
                raise FormatError(f"{path}: envelope kind is {env.protected['kind']!r}, expected 'bundle'")
            return cls(path, env, 16 + n, src)
        except BaseException:
            src.close()
            raise

    def _load_index(self, index: dict[str, Any]) -> None:
        """Check the manifest (docs/format.md, section 4): names and empty directories are safe relative
        paths that cannot collide when extracted, modes are permission bits, ``root: file`` holds one file."""
        what = f"{self.path}: the bundle manifest"
        root = index.get("root")
        if root not in ("file", "dir"):
            raise FormatError(f"{what} field root must be 'file' or 'dir'")
        dirs = schema.strings(index.get("dirs", []), f"{what} field dirs")
        super()._load_index(index)
        for e in self.entries:
            if "mode" in e.info:
                schema.integer(e.info["mode"], f"{what} mode of {e.name[:80]!r}", 0, 0o7777)
        _check_tree([e.name for e in self.entries], dirs, what)
        if root == "file" and (len(self.entries) != 1 or dirs):
            raise FormatError(f"{what}: a single-file bundle must hold exactly one file and no directories")

    def encode_header(self, size: int | None) -> bytes:
        return _header_bytes(self.envelope, size)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def read(self, name: str | None = None) -> bytearray:
        """Decrypt one file (the only one if ``name`` is None) into a new buffer. Caller owns it."""
        entry = self._pick(name)
        out = bytearray(entry.length)
        self.decrypt_many([(entry, memoryview(out))])
        return out

    def read_range(self, name: str, offset: int, length: int) -> bytearray:
        """Decrypt only the segments covering ``[offset, offset+length)`` of one file."""
        entry = self.entry(name)
        if offset < 0 or length < 0 or offset + length > entry.length:
            raise UsageError(f"range {offset}+{length} is outside {name!r} ({entry.length} bytes)")
        out = bytearray(length)
        self.decrypt_ranges([(entry, offset, offset + length, memoryview(out))])
        return out

    def _pick(self, name: str | None) -> Entry:
        if name is not None:
            return self.entry(name)
        if len(self.entries) != 1:
            raise UsageError(f"{self.path} holds {len(self.entries)} files; name the one to read")
        return self.entries[0]

    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.index))
