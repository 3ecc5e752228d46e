"""Where decrypted tensors live, and how their pages get mapped.

By default every tensor gets its own allocation from its framework (``torch.empty``, ``numpy.empty``).
Memory a caller frees is then reused by its next load: glibc keeps freed chunks of up to 32 MiB in its
heap, already mapped, which made repeated loads in one process about 2x faster than decrypting into a
fresh mapping each time (``bench/segments.py``, docs/benchmarks.md). It also means a tensor kept alive
keeps only its own memory, not the whole model's.

An *arena*, one page-aligned anonymous mapping for all the tensors of a load, is used only when
transparent huge pages are asked for (``MODELSEAL_HUGEPAGES=1``), since the advice needs one mapping.
They are not the default: with the kernel's usual ``defrag = madvise`` setting every advised region
compacts memory synchronously on its first faults, so a fresh process's load (the way a server starts)
costs anything from parity to 8x, depending on how fragmented memory is: 1 GiB took 1.9-2.0 s instead
of 0.35 s in ``bench/hugepages.py`` on the project's machines.

What makes fresh memory cheap instead is :func:`prefault`: each decryption worker asks the kernel to
map a segment's destination pages in one ``MADV_POPULATE_WRITE`` call just before filling them, rather
than taking one page fault per 4 KiB page from the copy loop. A page fault is an exception entry and
exit; on these VMs 262,144 of them (1 GiB) cost more than decrypting the gigabyte. Populating per
segment, on the workers, spreads that work over all cores and interleaves it with decryption
(``bench/prefault.py``). The loaders (``load/tensors.py``) hand it to the format as the ``prepare``
hook of ``Artifact.decrypt_many``: the format reads and decrypts, this module decides about memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable

ALIGN = 64  # every tensor starts cache-line aligned (and aligned for every dtype)
MIN_ARENA = 32 << 20  # below this, huge pages are not worth a mapping of their own
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python's mmap module has no name for it before 3.13


def layout(lengths: list[int]) -> tuple[list[int], int]:
    """Offsets of each block in the arena, and the arena's total size."""
    offsets, pos = [], 0
    for n in lengths:
        offsets.append(pos)
        pos += -(-n // ALIGN) * ALIGN
    return offsets, pos


def _hugepages_asked() -> bool:
    return os.environ.get("MODELSEAL_HUGEPAGES") == "1"


def wanted(nbytes: int) -> bool:
    """Whether a load of ``nbytes`` in all should share one arena: only for huge pages (module docstring)."""
    return nbytes >= MIN_ARENA and _hugepages_asked()


def allocate(nbytes: int) -> mmap.mmap | bytearray:
    """A zero-filled, writable buffer of ``nbytes`` (huge-page advised only with MODELSEAL_HUGEPAGES=1)."""
    if nbytes == 0:
        return bytearray()
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError):  # pragma: no cover - non-POSIX
        return bytearray(nbytes)
    if _hugepages_asked():
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # pragma: no cover - kernel without THP
            pass
    return buf


def _load_madvise() -> Callable[[int, int, int], int] | None:
    if os.environ.get("MODELSEAL_PREFAULT") == "0" or not os.uname().sysname == "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise  # the process's own libc: no ldconfig subprocess
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    probe = mmap.mmap(-1, mmap.PAGESIZE)  # kernels before 5.14 answer EINVAL: fault as before
    anchor = ctypes.c_char.from_buffer(probe)
    works = fn(ctypes.addressof(anchor), mmap.PAGESIZE, _MADV_POPULATE_WRITE) == 0
    del anchor
    probe.close()
    return fn if works else None  # type: ignore[no-any-return]


_madvise = _load_madvise()


def prefault(view: memoryview) -> None:
    """Map every page under the writable buffer ``view`` in one system call (see the module docstring).

    Contents are untouched (pages shared with neighbouring data are only mapped, never written). It
    is only an optimisation: where the kernel lacks ``MADV_POPULATE_WRITE`` (before 5.14, or not
    Linux) or refuses it for a mapping, pages fault in as they are written, as they always did.
    ``MODELSEAL_PREFAULT=0`` turns it off for comparison.
    """
    if _madvise is None:
        return
    try:
        anchor = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):  # read-only, released or empty: not a destination
        return
    size, addr = view.nbytes, ctypes.addressof(anchor)
    del anchor  # release the export at once: the buffer's owner may want to close it later
    first = addr & ~(mmap.PAGESIZE - 1)
    end = -(-(addr + size) // mmap.PAGESIZE) * mmap.PAGESIZE
    _madvise(first, end - first, _MADV_POPULATE_WRITE)
