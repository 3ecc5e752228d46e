"""One allocation for all the tensors of a load: one page-aligned anonymous mapping instead of one
allocation per tensor. Tensors are views into the arena: the memory is released when the last of them
is garbage collected (like tensors mmapped by ``safetensors``).

Transparent huge pages are *not* requested by default. ``MADV_HUGEPAGE`` makes decryption into fresh
memory faster inside a long-lived process (``bench/decrypt.py``), but with the kernel's usual
``defrag = madvise`` setting every advised region compacts memory synchronously on its first faults, so
a fresh process's load (the way a server starts) costs anything from parity to 8x, depending on how
fragmented memory is: 1 GiB took 1.9-2.0 s instead of 0.35 s in ``bench/hugepages.py`` on the project's
machines (docs/benchmarks.md). ``MODELSEAL_HUGEPAGES=1`` asks for them anyway.
"""

from __future__ import annotations

import mmap
import os

ALIGN = 64  # every tensor starts cache-line aligned (and aligned for every dtype)
MIN_ARENA = 32 << 20  # below this, a fresh mapping costs more than it saves: use the ordinary allocator


def layout(lengths: list[int]) -> tuple[list[int], int]:
    """Offsets of each block in the arena, and the arena's total size."""
    offsets, pos = [], 0
    for n in lengths:
        offsets.append(pos)
        pos += -(-n // ALIGN) * ALIGN
    return offsets, pos


def allocate(nbytes: int) -> mmap.mmap | bytearray:
    """A zero-filled, writable buffer of ``nbytes`` (huge-page advised only with MODELSEAL_HUGEPAGES=1)."""
    if nbytes == 0:
        return bytearray()
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError):  # pragma: no cover - non-POSIX
        return bytearray(nbytes)
    if os.environ.get("MODELSEAL_HUGEPAGES") == "1":
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # pragma: no cover - kernel without THP
            pass
    return buf
