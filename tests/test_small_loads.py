"""What keeps a small load's fixed cost down without changing behaviour (issue 18, small loads): one
process-wide decryption pool that a forked child makes again, the calling thread taking part in loads of
a few segments, and a package whose public names are imported on first use."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import modelseal
import modelseal.numpy
from modelseal.crypto import parallel
from modelseal.recipients.hpke import HpkeIdentity


def _sealed(tmp_path: Path, host: HpkeIdentity, n: int) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    tensors = {f"t{i}": rng.standard_normal((64, 33)).astype(np.float32) for i in range(n)}
    safetensors.numpy.save_file(tensors, str(tmp_path / "plain.safetensors"))
    modelseal.seal(tmp_path / "plain.safetensors", tmp_path / "sealed.safetensors", [host.recipient])
    return tmp_path / "sealed.safetensors", tensors


def test_forked_child_loads_after_parent_used_the_pool(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's pool threads do not exist in a fork; before the fix the child's first load queued its
    segments on that pool and waited forever (multiprocessing's default start method on Linux is fork)."""
    monkeypatch.setenv("MODELSEAL_THREADS", "2")
    path, want = _sealed(tmp_path, host, 6)
    assert modelseal.numpy.load_file(path, identity=host).keys() == want.keys()  # the parent's pool exists now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and exit status
        try:
            got = modelseal.numpy.load_file(path, identity=host)
            ok = got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
            os.write(write, b"ok" if ok else b"wrong")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 30
    while True:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's load hung on its parent's thread pool")
        time.sleep(0.02)
    with os.fdopen(read, "rb") as f:
        assert f.read() == b"ok"


def test_the_calling_thread_works_beside_the_pool() -> None:
    """The caller takes jobs from the same queue as the pool (no hand-over and wait): two jobs that
    each wait for the other to start run on the caller and on one pool thread, at the same time."""
    both = threading.Barrier(2, timeout=10)
    where: dict[int, int] = {}

    def job(i: int) -> None:
        both.wait()
        where[i] = threading.get_ident()

    parallel.run_all(job, [0, 1], workers=2)
    assert threading.get_ident() in where.values() and len(set(where.values())) == 2


def test_a_failing_job_on_the_calling_thread_waits_for_the_pool() -> None:
    """The caller's own job failing is raised only once every job the pool started has finished."""
    finished: list[int] = []
    started = threading.Event()

    def job(i: int) -> None:
        if i == 0:
            assert started.wait(10)  # fail only once the pool's job is under way
            raise ValueError("first job failed")
        started.set()
        time.sleep(0.2)
        finished.append(i)

    with pytest.raises(ValueError, match="first job failed"):
        parallel.run_all(job, [0, 1], workers=2)
    assert finished == [1]


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_public_names_are_imported_on_first_use() -> None:
    """``import modelseal`` no longer imports the sealing pipeline, recipient kinds or loaders; every public
    name and formerly eager submodule still resolves, and ``from modelseal import *`` still works."""
    code = (
        "import sys, modelseal\n"
        "heavy = [m for m in ('modelseal.sealing.writer', 'modelseal.load.tensors', 'modelseal.recipients.hpke')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "for name in modelseal.__all__ + ['KEMS', 'HpkeIdentity']:\n"
        "    assert getattr(modelseal, name) is not None, name\n"
        "assert modelseal.recipients.passphrase.Passphrase is modelseal.Passphrase\n"
        "assert modelseal.crypto.signing.Signer is modelseal.Signer\n"
        "assert set(modelseal.__all__) <= set(dir(modelseal))\n"
        "try:\n"
        "    modelseal.no_such_name\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    assert _python(code) == "module 'modelseal' has no attribute 'no_such_name'"
    assert _python("from modelseal import *; print(safe_open.__name__, seal.__name__)") == "safe_open seal"


def test_loading_safetensors_imports_no_sealing_or_bundle_code() -> None:
    code = (
        "import sys, modelseal.torch, modelseal.numpy\n"
        "print(sorted(m for m in ('modelseal.sealing.writer', 'modelseal.load.bundles', 'modelseal.crypto.signing')"
        " if m in sys.modules))\n"
    )
    assert _python(code) == "[]"


def test_a_byte_view_keeps_its_tensor_alive() -> None:
    """Review H1: the writable view a decryption worker fills must own the tensor's memory, so a worker
    still writing after its load failed never writes into freed memory."""
    import gc
    import weakref

    import torch

    from modelseal.load.tensors import memory_of

    tensor = torch.empty(1024, dtype=torch.bfloat16)
    alive = weakref.ref(tensor)
    view = memory_of(tensor)
    del tensor
    gc.collect()
    assert alive() is not None and view.nbytes == 2048 and not view.readonly
    view[:] = b"\x01" * 2048
    assert bool((alive().view(torch.uint8) == 1).all())  # type: ignore[union-attr]
    view.release()
    gc.collect()
    assert alive() is None


def test_an_empty_tensor_with_huge_dimensions_loads(tmp_path: Path) -> None:
    """Review L2: a zero-size tensor whose shape holds dimensions no tensor could have strides for
    ([0, 2**62, 2**62]) is valid safetensors; it loads as an empty tensor of that shape (torch.empty of
    the shape itself raised a bare RuntimeError)."""
    import json
    import struct

    import modelseal
    from modelseal.recipients.hpke import KEMS, HpkeIdentity
    from modelseal.torch import load_file

    host = HpkeIdentity.generate(KEMS["x25519"])
    header = json.dumps({"z": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]},
                         "x": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}).encode()  # fmt: skip
    header += b" " * (-len(header) % 8)
    plain, sealed = tmp_path / "p.safetensors", tmp_path / "s.safetensors"
    plain.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(8)))
    modelseal.seal(plain, sealed, [host.recipient])
    got = load_file(sealed, identity=host)
    assert tuple(got["z"].shape) == (0, 2**62, 2**62) and got["x"].tolist() == list(range(8))
