"""A sealed artifact at a URL, as the format's :class:`~modelseal.format.container.ByteSource`.

Opening reads the first :data:`HEAD_BYTES` (the header of nearly every sealed file) in one request and
keeps them; a longer header, and the tag region, are read whole on first use (16 bytes per segment: 4 KiB
per GiB). The payload is never held: :meth:`RemoteSource.read_parts` streams one range into the buffers
that the format decrypts in, and the format groups consecutive segments into ranges of ``part_size`` and
runs ``concurrency`` of them at once on the decryption thread pool (``crypto/parallel.py``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

from modelseal.errors import NotSealedError, UsageError
from modelseal.load.remote import display, s3
from modelseal.load.remote.config import RemoteSettings, settings
from modelseal.load.remote.http import RangeReader

HEAD_BYTES = 256 << 10


class RemoteSource:
    """One remote object opened for reading (see the module docstring)."""

    def __init__(self, url: str, conf: RemoteSettings | None = None) -> None:
        conf = conf or settings()
        if url.lower().startswith("s3://"):
            obj = s3.S3Object(url)
            self.path = url
            # presigned URLs carry their own authorization: a bearer token would go to the S3 endpoint
            self._reader = RangeReader(obj.presigned, url, dataclasses.replace(conf, token=None, token_hosts=()))
            self._reader.size = obj.size
        else:
            self.path = display(url)
            self._reader = RangeReader(lambda: url, self.path, conf)
        self.part_size: int | None = conf.part_size
        self.workers: int | None = conf.concurrency
        self._cache: dict[tuple[int, int], bytes] = {}
        self._lock = threading.Lock()
        if self._reader.size == 0:
            raise NotSealedError(f"{self.path} is not a sealed modelseal file (it is empty)")
        self._head = self._reader.head(HEAD_BYTES)
        if not self._head:
            raise NotSealedError(f"{self.path} is not a sealed modelseal file (it is empty)")

    @property
    def size(self) -> int:
        assert self._reader.size is not None  # set by the first answer
        return self._reader.size

    def region(self, offset: int, length: int) -> bytes:
        """Served from the bytes read at open when inside them, else read (and kept) once."""
        length = max(0, min(length, self.size - offset))
        if offset + length <= len(self._head):
            return self._head[offset : offset + length]
        with self._lock:
            found = self._cache.get((offset, length))
        if found is None:
            buf = bytearray(length)
            self.read_into(memoryview(buf), offset)
            found = bytes(buf)
            with self._lock:
                self._cache[(offset, length)] = found
        return found

    def read_into(self, out: memoryview, offset: int) -> None:
        self.read_parts(offset, [out], lambda _i: None)

    def read_parts(self, offset: int, outs: Sequence[memoryview], done: Callable[[int], None]) -> None:
        end = offset + sum(len(o) for o in outs)
        if offset < 0 or end > self.size:
            raise UsageError(f"{self.path}: bytes {offset}-{end} are outside the object")
        self._reader.read_parts(offset, outs, done)

    def close(self) -> None:
        """Nothing to release: connections stay pooled for the next load, and nothing was cached on disk."""
        self._cache.clear()


def open_remote(url: str) -> RemoteSource:
    return RemoteSource(url)
