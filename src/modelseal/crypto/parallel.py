"""Run segment jobs on all cores.

``cryptography`` >= 50 releases the GIL inside AES-GCM, so plain threads scale across cores. A failed
job stops the jobs that have not started yet, and :func:`run_all` waits for the running ones before it
re-raises, so the caller can wipe every output buffer knowing no thread still writes into it.

The cyclic garbage collector is paused while jobs run. Each segment allocates a few Python objects,
and in a process holding PyTorch's hundreds of thousands of objects the full collection that these
allocations sooner or later trigger holds the GIL for tens of milliseconds, stalling every worker:
1 GiB loads measured 15% slower whenever one fell inside the load. Reference counting still frees
everything; the collector resumes when the last concurrent :func:`run_all` returns.

One pool per width serves the whole process: made on first use, its threads started as jobs need them,
and reused by every later call (a small load should not pay for starting threads each time). A forked
child cannot use its parent's pool (the threads did not survive the fork, but the pool still counts
them, so jobs would queue forever): the pools are forgotten in the child and made again there.
With no more jobs than threads (a load of one or two segments), the calling thread runs the first job
itself while the pool runs the others, instead of handing every job over and waiting.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}  # by size: one per core for local reads, wider for network reads


def worker_count() -> int:
    """Threads used for decryption: ``MODELSEAL_THREADS`` or the number of usable cores."""
    env = os.environ.get("MODELSEAL_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


_paused = 0  # concurrent run_all calls holding the collector paused
_resume = False  # whether the collector was enabled when the first of them paused it


@contextmanager
def _collector_paused() -> Iterator[None]:
    global _paused, _resume
    with _lock:
        if _paused == 0:
            _resume = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _lock:
            if _paused > 0:  # 0 only in a child forked from inside a job (the count was reset there)
                _paused -= 1
                if _paused == 0 and _resume:
                    gc.enable()


def _executor(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads, made once and reused by every later call of that width
    (threads start lazily, so a pool never used past its first job costs one thread)."""
    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="modelseal")
        return pool


def _forget_after_fork() -> None:
    """In a forked child: drop the parent's pools and reset the lock and the collector's pause count.

    Only the forking thread survives a fork. A pool made by the parent still counts its threads, so it
    would never start new ones and the child's first load would wait forever; a run in flight on
    another thread would leave the lock held or the collector paused for good.
    """
    global _lock, _paused
    _lock = threading.Lock()
    _pools.clear()
    if _paused and _resume:
        gc.enable()
    _paused = 0


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_after_fork)


def run_all(
    job: Callable[[T], object],
    items: Iterable[T],
    progress: Callable[[T], None] | None = None,
    *,
    workers: int | None = None,
) -> None:
    """Run ``job`` on every item in parallel; raise the first failure after all workers stopped.

    ``workers`` (default :func:`worker_count`) is how many run at once: a remote source asks for more
    threads than cores, since each waits on the network most of the time (AES-GCM releases the GIL too).
    """
    items = list(items)
    width = workers if workers and workers > 0 else worker_count()
    if len(items) <= 1 or width == 1:
        for item in items:
            job(item)
            if progress:
                progress(item)
        return
    failed = threading.Event()

    def guarded(item: T) -> None:
        if failed.is_set():
            return
        try:
            job(item)
        except BaseException:
            failed.set()
            raise
        if progress:
            progress(item)

    # No more jobs than threads: this thread runs the first one while the pool starts the others (no
    # handover and wake-up before any work begins). Otherwise it hands every job over and waits, so
    # Ctrl-C, which lands here, never interrupts a job halfway.
    mine = items[0] if len(items) <= width else None
    with _collector_paused():
        pool = _executor(width)
        futures = [pool.submit(guarded, item) for item in (items[1:] if mine is not None else items)]
        try:
            if mine is not None:
                guarded(mine)
            wait(futures)
        except BaseException:  # a failed job of this thread, or Ctrl-C: stop, never leave a worker writing
            failed.set()
            for fut in futures:
                fut.cancel()
            wait(futures)  # the caller may close the file or wipe the buffer these jobs write into
            raise
    for fut in futures:
        exc = fut.exception()
        if exc is not None:
            raise exc
