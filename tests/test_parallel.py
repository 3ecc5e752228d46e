"""run_all never returns (or raises) while a worker still runs: callers close files and wipe buffers next."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from modelseal.crypto import parallel


def test_ctrl_c_waits_for_running_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """ac0b701 re-raised KeyboardInterrupt at once, leaving workers writing into a closed fd or wiped buffer.

    Ctrl-C lands in the calling thread, which runs jobs too: its own job is cut short there, but no
    job of the pool may still be running once run_all raises, and no job starts after the interrupt."""
    monkeypatch.setenv("MODELSEAL_THREADS", "2")
    lock = threading.Lock()
    started: list[int] = []
    running: set[int] = set()

    def job(item: int) -> None:
        with lock:
            started.append(item)
            running.add(item)
        try:
            time.sleep(0.3)
        finally:
            with lock:
                running.discard(item)

    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        parallel.run_all(job, range(40))
    assert started and not running  # every job that began has ended (or was cut short, in this thread)
    assert len(started) <= 3  # one job each when Ctrl-C came, and perhaps one the worker had just taken


def test_the_calling_thread_works_and_every_item_runs_once() -> None:
    """The caller takes items from the shared queue too: all items run, each once, on at most the
    number of threads asked for."""
    seen: list[int] = []
    threads: set[int] = set()
    lock = threading.Lock()

    def job(item: int) -> None:
        time.sleep(0.002)
        with lock:
            seen.append(item)
            threads.add(threading.get_ident())

    parallel.run_all(job, range(50), workers=3)
    assert sorted(seen) == list(range(50))
    assert threading.get_ident() in threads and len(threads) <= 3


def test_a_failure_stops_the_queue_and_is_raised_after_the_workers_stopped() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def job(item: int) -> None:
        if item == 3:
            raise ValueError("segment 3 failed")
        time.sleep(0.01)
        with lock:
            done.append(item)

    with pytest.raises(ValueError, match="segment 3"):
        parallel.run_all(job, range(200), workers=2)
    finished = len(done)
    time.sleep(0.05)
    assert len(done) == finished < 20  # nothing ran on after the raise, and the rest never started
