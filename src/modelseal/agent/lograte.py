"""Repeated log lines are rate-limited, and what was left out is counted, so a flood cannot fill the disk.

A local user who opens thousands of connections, or asks for thousands of keys, makes the agent log
the same kind of line (same logger, level and format string) over and over. :class:`RepeatFilter` lets
``burst`` such lines through per ``window_s`` and drops the rest; when the window ends it logs one line
with the count ("suppressed 1,234 lines like: ..."), so the operator still sees that the flood happened
and how large it was. Lines of other kinds are unaffected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

SUMMARY = "suppressed %d lines like: %s (at most %d of a kind per %g s are logged)"


_OVERFLOW = ("modelseal.agent", logging.WARNING, "(lines of too many different kinds)")


@dataclass
class _Window:
    start: float
    passed: int = 0
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    """Pass at most ``burst`` records of one kind per ``window_s``; count the rest and log the count.

    Installed on the loggers the agent writes to (see :func:`install`); :meth:`flush` (called
    periodically and at shutdown) reports windows that ended without a later line of their kind."""

    def __init__(
        self, burst: int = 20, window_s: float = 10.0, max_kinds: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst, self.window_s, self.max_kinds, self.clock = burst, window_s, max_kinds, clock
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self.total_suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg is SUMMARY:
            return True  # our own count lines pass (at most one per kind and window)
        now = self.clock()
        kind = self._kind(record, now)
        window = self._windows.get(kind)
        if window is None:
            window = self._windows[kind] = _Window(now)
        elif now - window.start >= self.window_s:
            self._report(kind, window)
            window.start, window.passed = now, 0
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.suppressed += 1
        self.total_suppressed += 1
        return False

    def _kind(self, record: logging.LogRecord, now: float) -> tuple[str, int, str]:
        kind = (record.name, record.levelno, str(record.msg)[:200])
        if kind not in self._windows and len(self._windows) >= self.max_kinds:
            self.flush(now)
            if len(self._windows) >= self.max_kinds:  # every kind is mid-window: they share one
                return _OVERFLOW
        return kind

    def flush(self, now: float | None = None) -> None:
        """Log the count of every window that has ended, and forget those windows."""
        now = self.clock() if now is None else now
        for kind, window in list(self._windows.items()):
            if now - window.start >= self.window_s:
                del self._windows[kind]
                self._report(kind, window)

    def flush_all(self) -> None:
        """Log every pending count (at shutdown)."""
        for kind, window in list(self._windows.items()):
            del self._windows[kind]
            self._report(kind, window)

    def _report(self, kind: tuple[str, int, str], window: _Window) -> None:
        if window.suppressed:
            name, level, template = kind
            count, window.suppressed = window.suppressed, 0
            logging.getLogger(name).log(level, SUMMARY, count, template, self.burst, self.window_s)


LOGGERS = ("modelseal.agent", "asyncio")  # the agent's own lines and the event loop's (accept errors)


def install(burst: int = 20, window_s: float = 10.0, names: tuple[str, ...] = LOGGERS) -> RepeatFilter:
    """One :class:`RepeatFilter` on each named logger (a filter acts where a record is logged)."""
    limiter = RepeatFilter(burst, window_s)
    for name in names:
        logging.getLogger(name).addFilter(limiter)
    return limiter


def uninstall(limiter: RepeatFilter, names: tuple[str, ...] = LOGGERS) -> None:
    limiter.flush_all()
    for name in names:
        logging.getLogger(name).removeFilter(limiter)
