"""``safe_open(...).get_slice``: partial tensors decrypt exactly the right elements, and only the segments
that hold them (a tensor-parallel rank never needs the rest of the file)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelseal
from modelseal.crypto import parallel
from modelseal.errors import AuthenticationError, UsageError
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.slicing import plan
from modelseal.recipients.hpke import HpkeIdentity

SEGMENT = 4096  # the smallest segment size, so that small tensors span many segments

SHAPES = {
    "matrix": ((96, 40), torch.float32),  # 15 KiB: four segments
    "cube": ((9, 14, 33), torch.bfloat16),
    "bytes": ((5000,), torch.uint8),
    "wide": ((3, 2048), torch.float64),  # rows of 16 KiB: a segment boundary inside every row
    "scalar": ((), torch.int64),
    "empty": ((0, 7), torch.float32),
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, (shape, dtype) in SHAPES.items():
        raw = torch.randint(0, 256, (int(np.prod(shape, dtype=np.int64)) * dtype.itemsize,), generator=g)
        out[name] = raw.to(torch.uint8).view(dtype).reshape(shape)
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (random bit patterns include NaNs, which never compare equal)."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1)).view(torch.uint8)


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, host: HpkeIdentity) -> Path:
    d = tmp_path_factory.mktemp("slices")
    safetensors.torch.save_file(_tensors(), str(d / "plain.safetensors"))
    modelseal.seal(d / "plain.safetensors", d / "sealed.safetensors", [host.recipient], segment_size=SEGMENT)
    return d / "sealed.safetensors"


def _one_index(size: int) -> st.SearchStrategy[Any]:
    bound = st.none() | st.integers(-size - 3, size + 3)
    slices = st.builds(slice, bound, bound)
    return slices | st.integers(-size, size - 1) if size else slices


@st.composite
def name_and_index(draw: st.DrawFn) -> tuple[str, Any]:
    """A tensor and an index for it: leading indices, optionally ``...`` and trailing ones, or a bare one."""
    name = draw(st.sampled_from(sorted(SHAPES)))
    shape = SHAPES[name][0]
    front = draw(st.integers(0, len(shape)))
    lead = [draw(_one_index(size)) for size in shape[:front]]
    if draw(st.booleans()):
        back = draw(st.integers(0, len(shape) - front))
        trail = [draw(_one_index(size)) for size in shape[len(shape) - back :]]
        return name, (*lead, ..., *trail)
    return name, lead[0] if len(lead) == 1 and draw(st.booleans()) else tuple(lead)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=name_and_index())
def test_slices_match_torch_indexing(sealed: Path, host: HpkeIdentity, case: tuple[str, Any]) -> None:
    name, index = case
    want = _tensors()[name][index]
    with modelseal.safe_open(sealed, "pt", identity=host) as f:
        got = f.get_slice(name)[index]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(_raw(got), _raw(want))


def test_numpy_slices_and_metadata(sealed: Path, host: HpkeIdentity) -> None:
    with modelseal.safe_open(sealed, "np", identity=host) as f:
        sl = f.get_slice("matrix")
        assert sl.get_shape() == [96, 40] and sl.get_dtype() == "F32"
        got = sl[10:20, 3]
    np.testing.assert_array_equal(got, _tensors()["matrix"][10:20, 3].numpy())


def test_row_shard_reads_only_its_segments(tmp_path: Path, sealed: Path, host: HpkeIdentity) -> None:
    """Damage every segment but the ones a row shard needs: the shard still loads, the rest fails."""
    bad = tmp_path / "bad.safetensors"
    data = bytearray(sealed.read_bytes())
    with SealedSafetensors.open(sealed) as art:
        art.unlock(host)
        entry = art.entry("matrix")
        shard = plan([96, 40], 4, slice(48, 72))  # rows 48..71: bytes 7680..11520, segments 1 and 2
        keep = {
            s.index
            for s in art.plan(entry)
            if s.offset - entry.begin < shard.hi and s.offset - entry.begin + s.length > shard.lo
        }
        assert keep == {1, 2}
        for s in art.plan(entry):
            if s.index not in keep:
                data[art.payload_offset + s.offset] ^= 0x01
    bad.write_bytes(bytes(data))
    with modelseal.safe_open(bad, "pt", identity=host) as f:
        assert torch.equal(_raw(f.get_slice("matrix")[48:72]), _raw(_tensors()["matrix"][48:72]))
        with pytest.raises(AuthenticationError, match="'matrix' segment 0"):
            f.get_slice("matrix")[:10]
        with pytest.raises(AuthenticationError):
            f.get_tensor("matrix")


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (slice(0, 10, 2), "only step 1"),
        ((0, 0, 0), "too many indices"),
        (96, "out of range"),
        (-97, "out of range"),
        ("a", "must be an integer or a slice"),
        ((..., ...), "at most one"),
        (slice(0.5, 2), "must be integers"),
        (True, "must be an integer"),
    ],
)
def test_bad_indices_are_clear_errors(sealed: Path, host: HpkeIdentity, index: Any, message: str) -> None:
    with modelseal.safe_open(sealed, "pt", identity=host) as f, pytest.raises(UsageError, match=message):
        f.get_slice("matrix")[index]


def test_unknown_tensor(sealed: Path, host: HpkeIdentity) -> None:
    with modelseal.safe_open(sealed, "pt", identity=host) as f, pytest.raises(UsageError, match="no entry named"):
        f.get_slice("nope")


def test_collector_pause_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_all pauses the cyclic collector (see parallel.py) and always restores it, even when jobs fail."""
    monkeypatch.setenv("MODELSEAL_THREADS", "2")
    seen: list[bool] = []

    def job(_: int) -> None:
        seen.append(gc.isenabled())

    assert gc.isenabled()
    parallel.run_all(job, [1, 2])
    assert seen == [False, False] and gc.isenabled()

    def boom(_: int) -> None:
        raise ValueError("job failed")

    with pytest.raises(ValueError, match="job failed"):
        parallel.run_all(boom, [1, 2])
    assert gc.isenabled()
    gc.disable()
    try:
        parallel.run_all(lambda _: None, [1, 2])
        assert not gc.isenabled()  # the caller's choice is kept
    finally:
        gc.enable()
