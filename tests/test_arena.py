"""Destination memory: the arena layout and ``prefault`` (which must map pages and never change bytes)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelseal.memory import arena
from modelseal.recipients.hpke import HpkeIdentity

needs_populate = pytest.mark.skipif(arena._madvise is None, reason="kernel without MADV_POPULATE_WRITE")


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")  # pragma: no cover


@needs_populate
def test_prefault_maps_fresh_pages_before_they_are_written() -> None:
    size = 64 << 20
    buf = arena.allocate(size)
    assert isinstance(buf, mmap.mmap)
    before = rss_kib()
    arena.prefault(memoryview(buf)[4096 : size - 4096])
    grown = rss_kib() - before
    assert grown >= (size >> 10) - 64, f"only {grown} KiB of {size >> 10} KiB became resident"
    assert buf[:] == bytes(size)  # still zero-filled: populating maps pages, it writes nothing
    buf.close()


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 3 * 4096), length=st.integers(0, 5 * 4096))
def test_prefault_never_changes_bytes_in_or_around_the_view(start: int, length: int) -> None:
    data = bytearray(os.urandom(9 * 4096))
    snapshot = bytes(data)
    arena.prefault(memoryview(data)[start : start + length])
    assert data == snapshot


def test_prefault_ignores_buffers_that_are_not_destinations() -> None:
    arena.prefault(memoryview(b"read-only bytes"))
    released = memoryview(bytearray(10))
    released.release()
    arena.prefault(released)
    arena.prefault(memoryview(bytearray(0)))


def test_prefault_can_be_turned_off() -> None:
    code = "from modelseal.memory import arena; print(arena._madvise is None)"
    env = {**os.environ, "MODELSEAL_PREFAULT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_layout_aligns_every_block() -> None:
    offsets, total = arena.layout([1, 0, 100, 64, 3])
    assert offsets == [0, 64, 64, 192, 256]
    assert total == 320
    assert all(o % arena.ALIGN == 0 for o in offsets)


def _owner(array: object) -> object:
    """The object that owns an array's memory: the end of its ``base`` chain, past any memoryview."""
    while getattr(array, "base", None) is not None:
        array = array.base  # type: ignore[attr-defined]
    return array.obj if isinstance(array, memoryview) else array


@pytest.mark.parametrize("hugepages", [False, True])
def test_tensors_own_their_memory_unless_huge_pages_are_asked_for(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch, hugepages: bool
) -> None:
    """Own allocations let a later load reuse freed memory; huge pages need the one shared mapping."""
    import numpy as np
    from safetensors.numpy import save_file

    import modelseal
    import modelseal.numpy

    rng = np.random.default_rng(0)
    tensors = {f"w{i}": rng.standard_normal(3 << 20).astype(np.float32) for i in range(3)}  # 36 MiB
    assert sum(t.nbytes for t in tensors.values()) >= arena.MIN_ARENA
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    modelseal.seal(tmp_path / "plain.safetensors", tmp_path / "sealed.safetensors", [host.recipient])
    if hugepages:
        monkeypatch.setenv("MODELSEAL_HUGEPAGES", "1")
    else:
        monkeypatch.delenv("MODELSEAL_HUGEPAGES", raising=False)
    loaded = modelseal.numpy.load_file(tmp_path / "sealed.safetensors", identity=host)
    for name, t in tensors.items():
        np.testing.assert_array_equal(loaded[name], t)
    owners = {id(_owner(a)) for a in loaded.values()}
    assert len(owners) == (1 if hugepages else len(tensors))
    assert isinstance(_owner(loaded["w0"]), mmap.mmap) == hugepages
