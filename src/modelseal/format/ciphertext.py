"""Reused buffers that hold one segment's ciphertext followed by its tag, the input of a decryption.

AES-GCM decrypts with the GIL released only through the one-shot AEAD call
(``AESGCM.decrypt_into``), which wants ciphertext and tag in one buffer; the streaming interface
(``Cipher(...).decryptor().update_into``) holds the GIL for the whole segment in ``cryptography`` 50,
so threads using it run one at a time (measured: two threads decrypting 64 MiB took 15x as long as
one). A sealed file keeps its tags apart from the ciphertext, so each worker reads a segment and its
tag into a buffer of this module and decrypts from there into the destination.

A fresh buffer costs a page fault per 4 KiB page, as much as the decryption itself, so buffers are
kept for the next segment and the next load: a free list of at most :data:`KEEP_BYTES` in all, each
buffer at most :data:`KEEP_ONE` bytes (a rarer, larger segment gets a buffer of its own, dropped
after use). Each is an anonymous mapping of a default segment's size, whose pages are only mapped
when first written: a small tensor's segment touches a few pages, not megabytes. They only ever hold
ciphertext, which is no secret.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from modelseal.crypto.segments import DEFAULT_SEGMENT_SIZE, TAG_SIZE

KEEP_ONE = DEFAULT_SEGMENT_SIZE + TAG_SIZE
KEEP_BYTES = 8 * KEEP_ONE  # enough for the workers of a local load on up to 8 cores

_lock = threading.Lock()
_free: list[mmap.mmap] = []


@contextmanager
def segment_buffer(length: int) -> Iterator[memoryview]:
    """A writable view of exactly ``length + TAG_SIZE`` bytes, for this caller alone until it exits."""
    need = length + TAG_SIZE
    buf = None
    with _lock:
        for i, candidate in enumerate(_free):
            if len(candidate) >= need:
                buf = _free.pop(i)
                break
    if buf is None:
        # private (a forked child gets its own copy), and untouched pages cost nothing
        buf = mmap.mmap(-1, max(need, KEEP_ONE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with memoryview(buf) as whole, whole[:need] as view:
        yield view
    _give_back(buf)


def _give_back(buf: mmap.mmap) -> None:
    kept = False
    if len(buf) <= KEEP_ONE:
        with _lock:
            if (len(_free) + 1) * KEEP_ONE <= KEEP_BYTES:
                _free.append(buf)
                kept = True
    if not kept:
        buf.close()


def _reset_after_fork() -> None:
    """In a forked child the lock may have been held by a thread that did not survive the fork."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reset_after_fork)
