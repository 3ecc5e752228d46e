"""Run segment jobs on all cores.

``cryptography`` >= 50 releases the GIL inside AES-GCM (``pread`` and ``madvise`` release it too), so
plain threads scale across cores. A failed job stops the jobs that have not started yet, and
:func:`run_all` waits for the running ones before it re-raises, so the caller can wipe every output
buffer knowing no thread still writes into it.

The cyclic garbage collector is paused while jobs run. Each segment allocates a few Python objects,
and in a process holding PyTorch's hundreds of thousands of objects the full collection that these
allocations sooner or later trigger holds the GIL for tens of milliseconds, stalling every worker:
1 GiB loads measured 15% slower whenever one fell inside the load. Reference counting still frees
everything; the collector resumes when the last concurrent :func:`run_all` returns.

One pool per width serves the whole process: made on first use, its threads started as jobs need them,
and reused by every later call (a small load should not pay for starting threads each time). A forked
child cannot use its parent's pool (the threads did not survive the fork, but the pool still counts
them, so jobs would queue forever): the pools are forgotten in the child and made again there.
The calling thread works too, taking jobs from the same queue as the pool's threads.
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

    ``workers`` (default :func:`worker_count`) is how many run at once, the calling thread included: a
    remote source asks for more threads than cores, since each waits on the network most of the time
    (AES-GCM releases the GIL too). The calling thread takes items from the same queue as the pool's
    threads, so work starts at once, not after every job was handed over and a thread started or woke
    up for it (which showed in a small model's first-load profile: docs/benchmarks.md, "Small loads").
    Ctrl-C lands in the calling thread and may cut its current job short; the pool's jobs finish, and
    nothing is returned or raised before they have: callers wipe every output on any exception.
    """
    items = list(items)
    wanted = workers if workers and workers > 0 else worker_count()
    width = min(wanted, len(items))
    if width <= 1:
        for item in items:
            job(item)
            if progress:
                progress(item)
        return
    stopped = [False]  # one store, which a signal cannot cut in half (Event.set runs Python code)
    errors: list[BaseException] = []
    queue = iter(items)
    taking = threading.Lock()

    def drain() -> None:
        """Run items off the shared queue until it is empty or some job failed."""
        while not stopped[0]:
            with taking:
                item = next(queue, _END)
            if item is _END:
                return
            try:
                job(item)  # type: ignore[arg-type]
                if progress:
                    progress(item)  # type: ignore[arg-type]
            except BaseException as exc:
                errors.append(exc)
                stopped[0] = True
                return

    interrupted: BaseException | None = None
    with _collector_paused():
        pool = _executor(wanted - 1)  # one pool per width asked for, whatever the number of items
        futures = [pool.submit(drain) for _ in range(width - 1)]
        try:
            try:
                drain()
            finally:  # the queue is empty, a job failed or Ctrl-C came: hand out no more items
                stopped[0] = True
                # one still queued (behind another load's jobs) has nothing left to do: cancelled, it never
                # runs, and is not waited for (wait() counts it done only once a worker has dequeued it)
                futures = [future for future in futures if not future.cancel()]
        except BaseException as exc:  # Ctrl-C outside a job
            interrupted = exc
        while True:  # never leave while a job runs: the caller may close the file or wipe its buffers next
            try:
                wait(futures)
                break
            except BaseException as exc:  # Ctrl-C again while waiting: keep waiting, raise it afterwards
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    if errors:
        raise errors[0]


_END = object()
