"""Key memory the agent controls: locked into RAM, kept out of core dumps, zeroed when dropped.

``mlock`` keeps a key out of swap where ``RLIMIT_MEMLOCK`` allows (a warning is logged once where it
does not); ``PR_SET_DUMPABLE=0`` and ``RLIMIT_CORE=0`` keep the process out of core dumps and stop
same-uid processes from attaching with ptrace. Python may still leave transient copies in freed
memory (an ``bytes`` object made by a library call); keys are handled as ``bytearray`` throughout to
keep those to a minimum. Root on the host can still read this memory (THREAT-MODEL.md).
"""

from __future__ import annotations

import ctypes
import logging
import resource

from modelseal.crypto.keys import wipe

log = logging.getLogger("modelseal.agent")
_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc (find_library runs ldconfig in a subprocess)
for _fn in (_libc.mlock, _libc.munlock):
    _fn.argtypes, _fn.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_PR_SET_DUMPABLE = 4
_warned = False


def harden_process() -> None:
    """Make this process non-dumpable and disable core files."""
    if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def is_dumpable() -> bool:
    return bool(_libc.prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE


class LockedKey:
    """A 32-byte key in a locked buffer; :meth:`wipe` (also on garbage collection) zeroes it."""

    def __init__(self, source: bytearray) -> None:
        self._buf = bytearray(len(source))
        self._view = (ctypes.c_char * len(source)).from_buffer(self._buf)
        self.locked = _libc.mlock(ctypes.addressof(self._view), len(source)) == 0
        if not self.locked:
            _warn_once()
        self._buf[:] = source
        wipe(source)

    def view(self) -> memoryview:
        return memoryview(self._buf)

    def wipe(self) -> None:
        if self._view is None:
            return
        wipe(self._buf)
        if self.locked:
            _libc.munlock(ctypes.addressof(self._view), len(self._buf))
        self._view = None  # type: ignore[assignment]

    def __del__(self) -> None:
        self.wipe()


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("mlock failed (errno %d): keys may be swapped out; raise RLIMIT_MEMLOCK", ctypes.get_errno())
