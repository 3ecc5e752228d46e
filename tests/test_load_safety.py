"""Decrypted bytes and in-place writes on the paths the review found unguarded, in milliseconds: rekey's
header write reaches only the file that was opened, a GPU-style load wipes its CPU staging buffers, the
ONNX memory file is zeroed on every path, and a runtime that fails after loading zeroes what it loaded."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
import modelseal.torch
import modelseal.transformers
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


# ------------------------------------------------------- a load for another device wipes its staging


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, memoryview]]:
    """Every (tensor, byte view) the loaders allocate to decrypt into, recorded as they are made."""
    from modelseal.load import tensors

    made: list[tuple[Any, memoryview]] = []
    real = tensors.allocate

    def recording(*args: Any, **kwargs: Any) -> list[tuple[Any, memoryview]]:
        out = real(*args, **kwargs)
        made.extend(out)
        return out

    monkeypatch.setattr(tensors, "allocate", recording)
    return made


def _wiped(made: list[tuple[Any, memoryview]]) -> bool:
    return bool(made) and all(not any(view) for _t, view in made)


def test_safe_open_for_another_device_wipes_the_cpu_copies(
    sealed: Path, host: HpkeIdentity, staged: list[tuple[Any, memoryview]]
) -> None:
    pytest.importorskip("torch")
    out = modelseal.torch.load_file(sealed, "meta", identity=host)
    assert {k: (v.device.type, tuple(v.shape)) for k, v in out.items()} == {"w": ("meta", (3000,)), "b": ("meta", (7,))}
    assert _wiped(staged)


def test_a_slice_for_another_device_wipes_its_cpu_copy(
    sealed: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    from modelseal.load import tensors

    made: list[Any] = []
    real = tensors._empty_bytes

    def recording(nbytes: int, framework: str) -> Any:
        made.append(real(nbytes, framework))
        return made[-1]

    monkeypatch.setattr(tensors, "_empty_bytes", recording)
    with modelseal.safe_open(sealed, "pt", device="meta", identity=host) as f:
        part = f.get_slice("w")[10:20]
    assert part.device.type == "meta" and tuple(part.shape) == (10,)
    assert made and not any(raw.any() for raw in made)


def test_transformers_for_another_device_wipes_the_cpu_copies(
    tmp_path: Path, host: HpkeIdentity, staged: list[tuple[Any, memoryview]]
) -> None:
    pytest.importorskip("torch")
    src = tmp_path / "dir"
    src.mkdir()
    save_file({"w": np.arange(3000, dtype=np.float32)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "x"}')
    modelseal.seal(src, tmp_path / "sealed", [host.recipient], segment_size=SEG)
    state = modelseal.transformers.load_state_dict(tmp_path / "sealed", identity=host, device="meta")
    assert state["w"].device.type == "meta"
    assert _wiped(staged)


def test_load_model_from_for_another_device_wipes_the_cpu_copies(
    sealed: Path, host: HpkeIdentity, staged: list[tuple[Any, memoryview]]
) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Module()
    model.w, model.b = torch.nn.Parameter(torch.empty(3000)), torch.nn.Parameter(torch.empty(7))
    with open_artifact(sealed, host) as art:
        modelseal.torch.load_model_from(model, art, device="meta")  # type: ignore[arg-type]
    assert model.w.device.type == "meta" and _wiped(staged)


def test_the_cpu_path_hands_over_the_decrypted_tensors_themselves(
    sealed: Path, host: HpkeIdentity, staged: list[tuple[Any, memoryview]]
) -> None:
    pytest.importorskip("torch")
    from modelseal.load.tensors import to_device

    out = modelseal.torch.load_file(sealed, identity=host)
    assert [id(t) for t in out.values()] == [id(t) for t, _v in staged]
    assert out["w"][2999].item() == 2999.0
    assert to_device(staged, "cpu")[0] is staged[0][0] and any(staged[0][1])


def test_a_state_dict_the_module_refuses_is_zeroed(sealed: Path, host: HpkeIdentity) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.empty(3000))  # no "b": strict loading fails after assigning "w"
    with open_artifact(sealed, host) as art, pytest.raises(RuntimeError, match="Unexpected key"):
        modelseal.torch.load_model_from(model, art)  # type: ignore[arg-type]
    assert not model.w.detach().any()
    other = torch.nn.Module()
    other.w = torch.nn.Parameter(torch.empty(3000))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # the public loader, by file name, alike
        modelseal.torch.load_model(other, sealed, identity=host)
    assert not other.w.detach().any()


# --------------------------------------------------------------------------- the ONNX memory file


def test_the_onnx_memory_file_is_zeroed_when_the_copy_into_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal import onnx

    if not hasattr(os, "memfd_create"):
        pytest.skip("no memfd_create here")
    kept: list[int] = []
    real_memfd, real_pwrite = os.memfd_create, os.pwrite

    def memfd(name: str, flags: int = 0) -> int:
        fd = real_memfd(name, flags)
        kept.append(os.dup(fd))  # the test's own handle, to read what is left after the file is closed
        return fd

    def short_then_full(fd: int, data: Any, offset: int) -> int:
        if offset == 0:
            return real_pwrite(fd, memoryview(data)[:100], 0)
        if any(memoryview(data)):  # copying the model: the disk is "full"; zeros still go through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "memfd_create", memfd)
    monkeypatch.setattr(os, "pwrite", short_then_full)
    with pytest.raises(OSError, match="No space"), onnx._memory_file(bytearray(b"\x07" * 1000)):
        pytest.fail("the body must not run")
    monkeypatch.undo()
    (fd,) = kept
    try:
        left = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    assert len(left) >= 100 and not any(left)


# ------------------------------------------------------------- a runtime that fails after loading


@pytest.mark.slow  # importing TensorFlow alone takes seconds
def test_a_savedmodel_without_the_requested_signature_is_zeroed_before_the_refusal(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow")
    import modelseal.tensorflow
    from modelseal.errors import UsageError
    from modelseal.serve.repository import ModelSpec
    from modelseal.serve.runtimes.tensorflow import TensorflowRuntime
    from modelseal.serve.source import open_source

    class Scale(tf.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.fill([64], 7.0))

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"y": x * self.w}

    model = Scale()
    tf.saved_model.save(model, str(tmp_path / "plain"), signatures={"serving_default": model.serve})
    modelseal.seal(tmp_path / "plain", tmp_path / "model.savedmodel.sealed", [host.recipient])
    loaded: list[Any] = []
    real = modelseal.tensorflow.saved_model_from_files

    def recording(*args: Any) -> Any:
        loaded.append(real(*args))
        return loaded[-1]

    monkeypatch.setattr(modelseal.tensorflow, "saved_model_from_files", recording)
    spec = ModelSpec("scale", tmp_path, "tensorflow_savedmodel", 0, (), (), parameters={"signature": "nope"})
    with open_source(tmp_path / "model.savedmodel.sealed", lambda: host) as source:
        with pytest.raises(UsageError, match="has no signature 'nope'"):
            TensorflowRuntime(spec, source, 0)
    (weights,) = {id(v): v for f in loaded[0].signatures.values() for v in f.variables}.values()
    assert not weights.numpy().any()


# --------------------------------------------------------------------------- every spelling of the CPU


@pytest.mark.parametrize("spelling", ["cpu", "cpu:0", "torch.device"], ids=str)
def test_every_spelling_of_the_cpu_gets_the_weights_not_zeros(sealed: Path, host: HpkeIdentity, spelling: str) -> None:
    """``t.to(cpu)`` returns ``t`` itself: wiping the "staging copy" of a CPU load would zero the weights
    handed back (``device=torch.device("cpu")`` returned all zeros for a while)."""
    torch = pytest.importorskip("torch")
    device: Any = torch.device("cpu") if spelling == "torch.device" else spelling
    expected = modelseal.torch.load_file(sealed, identity=host)
    assert expected["w"].any()
    got = modelseal.torch.load_file(sealed, device, identity=host)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with modelseal.safe_open(sealed, "pt", device=device, identity=host) as f:
        assert torch.equal(f.get_tensor("w"), expected["w"])
        assert torch.equal(f.get_slice("w")[10:20], expected["w"][10:20])


def test_to_device_never_wipes_a_tensor_it_hands_back() -> None:
    """Defence in depth: whatever the device, a "move" that returns the source keeps its bytes."""
    torch = pytest.importorskip("torch")
    from modelseal.load.tensors import to_device

    class Stays:  # a tensor whose .to() is a no-op, like .to(its own device)
        def to(self, *_: Any, **__: Any) -> Stays:
            return self

    kept, moved = bytearray(b"\x07" * 8), torch.arange(4.0)
    moved_bytes = bytearray(b"\x09" * 8)
    stays = Stays()
    out = to_device([(stays, memoryview(kept)), (moved, memoryview(moved_bytes))], "meta")
    assert out[0] is stays and kept == b"\x07" * 8  # handed back: untouched
    assert out[1].device.type == "meta" and not any(moved_bytes)  # copied away: its staging bytes wiped


def test_sealing_a_torchscript_archive_without_as_bundle_is_one_line(tmp_path: Path, host: HpkeIdentity) -> None:
    """torch.load printed its own warning (two lines naming our source) before our error."""
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from modelseal.cli.main import main

    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(tmp_path / "ts.pt"))
    result = CliRunner().invoke(main, ["seal", str(tmp_path / "ts.pt"), "-o", str(tmp_path / "x"), "-r",
                                       host.recipient.describe()])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "is a TorchScript archive" in result.output
    assert "--as-bundle" in result.output
    assert not (tmp_path / "x").exists()
