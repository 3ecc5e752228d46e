"""Sealing's pipeline: workers without batch barriers, one reused buffer each, writeback as windows fill.

What goes in comes out bit for bit at any worker count and across the writeback windows; memory stays
a few segments whatever the model size; a write that fails in any worker stops the others and leaves no
output; every window is handed to the disk once, whole, at an aligned offset.
"""

from __future__ import annotations

import os
import random
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import modelseal
import modelseal.numpy
from modelseal import atomicfile
from modelseal.format.container import in_parallel
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.sealing.operations import verify


def odd_tensors(total: int) -> dict[str, np.ndarray]:
    """Tensors of awkward sizes (empty, one byte, primes) and a few that span many segments."""
    rng = np.random.default_rng(3)
    sizes = [0, 1, 7, 4093, 65_537, 1 << 20, 3 * (1 << 20) + 5]
    out, left, i = {}, total, 0
    while left > 0:
        n = min(sizes[i % len(sizes)], left)
        out[f"t{i}"] = rng.integers(0, 256, n, dtype=np.uint8)
        left -= max(n, 1)
        i += 1
    return out


@pytest.mark.parametrize("threads", ["1", "3"])
def test_seal_round_trips_through_small_writeback_windows(
    tmp_path: Path,
    host: HpkeIdentity,
    host_key: Path,
    signer: modelseal.Signer,
    monkeypatch: pytest.MonkeyPatch,
    threads: str,
) -> None:
    monkeypatch.setenv("MODELSEAL_THREADS", threads)
    monkeypatch.setattr(atomicfile, "WRITEBACK_WINDOW", 64 << 10)  # windows and pages straddled everywhere
    monkeypatch.setattr(atomicfile, "WRITEBACK_DEPTH", 2)  # most windows are waited for and dropped
    tensors = odd_tensors(12 << 20)
    plain, sealed = tmp_path / "m.safetensors", tmp_path / "m.sealed"
    safetensors.numpy.save_file(tensors, str(plain))
    modelseal.seal(plain, sealed, [host.recipient], signer=signer, segment_size=256 << 10)
    loaded = modelseal.numpy.load_file(sealed, identity=host_key)
    assert loaded.keys() == tensors.keys()
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    [report] = verify(sealed, host_key, trusted_signers=[signer.public])
    assert report.signer == signer.public


def test_memory_is_a_few_segments_whatever_the_model_size(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One reused buffer per worker: the old code allocated two new ciphertexts per segment, batch after batch."""
    monkeypatch.setenv("MODELSEAL_THREADS", "2")
    seg = 1 << 20
    plain = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"w": np.ones(48 << 20, dtype=np.uint8)}, str(plain))
    tracemalloc.start()
    try:
        modelseal.seal(plain, tmp_path / "m.sealed", [host.recipient], segment_size=seg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * seg, f"sealing 48 segments held {peak / seg:.1f} segments of memory at its peak"


def test_a_failed_write_in_a_worker_stops_all_and_leaves_nothing(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSEAL_THREADS", "3")
    plain = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(8 << 20, dtype=np.uint8)}, str(plain))
    out = tmp_path / "out"
    out.mkdir()
    real, calls, lock = os.pwrite, [0], threading.Lock()

    def failing(fd: int, data: bytes, offset: int) -> int:
        with lock:
            calls[0] += 1
            if calls[0] == 20 and threading.current_thread() is not threading.main_thread():
                raise OSError(28, "No space left on device")
            if calls[0] >= 20 and threading.current_thread() is threading.main_thread():
                calls[0] = 19  # let a worker thread be the one that fails
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(atomicfile.WriteError, match="No space left on device"):
        modelseal.seal(plain, out / "m.sealed", [host.recipient], segment_size=64 << 10)
    assert list(out.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("modelseal-seal")]


def test_in_parallel_raises_the_first_failure_after_every_worker_stopped() -> None:
    done: list[int] = []
    items = iter(range(1000))
    lock = threading.Lock()

    def work(stop: threading.Event) -> None:
        while not stop.is_set():
            with lock:
                i = next(items, None)
            if i is None:
                return
            if i == 50:
                raise ValueError("segment 50")
            with lock:
                done.append(i)

    with pytest.raises(ValueError, match="segment 50"):
        in_parallel(4, work)
    assert len(done) < 999  # the others stopped early
    assert not [t for t in threading.enumerate() if t.name.startswith("modelseal-seal")]


def test_writeback_hands_each_window_to_the_disk_once_whole_and_aligned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(atomicfile, "_libc_sync", [lambda fd, off, n, flags: calls.append((off, n, flags)) or 0])
    start, size, window = 1000, 100_000, 4096
    with open(tmp_path / "f", "wb") as f:
        wb = atomicfile.Writeback(f.fileno(), start, size, window=window, depth=3)
        pieces, pos = [], start
        rng = random.Random(5)
        while pos < start + size:
            n = min(rng.randint(1, 9000), start + size - pos)
            pieces.append((pos, n))
            pos += n
        rng.shuffle(pieces)
        for off, n in pieces:
            wb.written(off, n)
    started = [off for off, n, flags in calls if flags == 2]
    first, last = start // window, (start + size - 1) // window
    assert sorted(started) == [i * window for i in range(first, last + 1)]
    assert all(n == window for _, n, _ in calls)
    waited = [off for off, _, flags in calls if flags == 7]
    assert len(waited) == len(started) - 3 and set(waited) <= set(started)  # all but the last `depth` dropped
