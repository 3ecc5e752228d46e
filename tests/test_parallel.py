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


def test_ctrl_c_twice_while_waiting_still_waits_for_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review H1/M1: a second Ctrl-C landing while run_all waits for the pool used to escape that wait,
    and the caller wiped and freed tensors a worker was still decrypting into. Both interrupts now
    land while it waits, and it still raises only once no job runs."""
    monkeypatch.setenv("MODELSEAL_THREADS", "2")
    lock = threading.Lock()
    running: set[int] = set()
    pool_started, first_done = threading.Event(), threading.Event()

    def job(item: int) -> None:
        with lock:
            running.add(item)
        try:
            if threading.current_thread() is threading.main_thread():
                assert pool_started.wait(10)  # the caller's job ends once the pool's is under way
                first_done.set()  # and the caller goes on to wait for it
                return
            pool_started.set()
            time.sleep(0.6)  # the pool's job: still running when both interrupts come
        finally:
            with lock:
                running.discard(item)

    def press_twice() -> None:
        first_done.wait(10)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_twice, daemon=True)
    presser.start()
    with pytest.raises(KeyboardInterrupt):
        parallel.run_all(job, [0, 1])
    assert not running
    presser.join(10)


def test_a_finished_call_does_not_wait_behind_another_calls_jobs() -> None:
    """Review L4: a call whose items all ran on its own thread cancels its queued pool task instead of
    waiting for another call's jobs to free the shared pool (a slow remote load held up a local one)."""
    release = threading.Event()
    slow = threading.Thread(target=parallel.run_all, args=(lambda _i: release.wait(20), range(4)), kwargs={"workers": 3})  # noqa: E501
    slow.start()
    try:
        time.sleep(0.2)  # the slow call holds every thread of the shared pool
        done = threading.Event()
        fast = threading.Thread(target=lambda: (parallel.run_all(lambda _i: None, range(2), workers=3), done.set()))
        fast.start()
        assert done.wait(10), "the finished call waited for the other call's jobs"
    finally:
        release.set()
        slow.join()
