"""run_all never returns (or raises) while a worker still runs: callers close files and wipe buffers next."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from modelseal.crypto import parallel


def test_ctrl_c_waits_for_running_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """ac0b701 re-raised KeyboardInterrupt at once, leaving workers writing into a closed fd or wiped buffer."""
    monkeypatch.setenv("MODELSEAL_THREADS", "2")
    started, finished = [], []

    def job(item: int) -> None:
        started.append(item)
        time.sleep(0.3)
        finished.append(item)

    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        parallel.run_all(job, range(40))
    assert started and sorted(started) == sorted(finished)  # every job that began also ended
    assert len(started) < 40  # and the rest were not started
