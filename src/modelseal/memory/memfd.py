"""Decrypted bytes in an anonymous memory file (``memfd_create``): a path for loaders that take only a
path (``/proc/self/fd/N``), never a file on a disk. ONNX Runtime reads such a file once and it is
dropped at once; a TVM library stays mapped from it while the model is loaded. Either way its pages
are zeroed before the descriptor is closed."""

from __future__ import annotations

import os

from modelseal.atomicfile import pwrite_all


def write_memory_file(name: str, data: bytes | bytearray | memoryview) -> int:
    """A new memory file named ``name`` holding ``data``, close-on-exec; its descriptor (the caller
    ends it with :func:`zero_and_close`). A copy that fails zeroes what reached the file and closes it."""
    view = memoryview(data).cast("B")
    written = 0
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        while written < len(view):
            written += os.pwrite(fd, view[written:], written)
    except BaseException:
        zero_and_close(fd, written)
        raise
    return fd


def zero_and_close(fd: int, size: int) -> None:
    """Overwrite the first ``size`` bytes of ``fd`` with zeros (1 MiB at a time), then close it, even
    when the zeroing fails."""
    try:
        zeros = bytes(min(size, 1 << 20))
        for start in range(0, size, len(zeros) or 1):
            pwrite_all(fd, zeros[: size - start], start)
    finally:
        os.close(fd)
