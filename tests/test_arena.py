"""Destination memory: the arena layout and ``prefault`` (which must map pages and never change bytes)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelseal import arena

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
    code = "from modelseal import arena; print(arena._madvise is None)"
    env = {**os.environ, "MODELSEAL_PREFAULT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_layout_aligns_every_block() -> None:
    offsets, total = arena.layout([1, 0, 100, 64, 3])
    assert offsets == [0, 64, 64, 192, 256]
    assert total == 320
    assert all(o % arena.ALIGN == 0 for o in offsets)
