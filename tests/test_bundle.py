"""Sealed bundles: files and directories, random access, streaming in bounded memory."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import AuthenticationError, UsageError
from modelseal.recipients.hpke import HpkeIdentity


def test_directory_bundle_round_trip(tmp_path: Path, host: HpkeIdentity) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty_dir").mkdir()
    files = {"a.txt": b"hello", "sub/b.bin": os.urandom(100_000), "sub/deeper/c": b"", "z.json": b"{}"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    out = tmp_path / "bundle.msb"
    from modelseal.crypto.keys import new_dek
    from modelseal.format import bundle

    bundle.seal_path(src, out, [host.recipient], builder=bundle.new_builder("m", "1", new_dek(), 8192))
    with modelseal.open_bundle(out, host) as b:
        assert sorted(b.names()) == sorted(files)
        for rel, data in files.items():
            assert bytes(b.read(rel)) == data
        assert b.manifest()["dirs"] == ["empty_dir"]
    assert b"a.txt" not in out.read_bytes()  # the manifest is encrypted
    dst = tmp_path / "opened"
    from modelseal.sealing.operations import open_to_disk

    open_to_disk(out, dst, host)
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data
    assert (dst / "empty_dir").is_dir()


def test_random_access_by_segment(tmp_path: Path, host: HpkeIdentity) -> None:
    data = os.urandom(50_000)
    (tmp_path / "f.dat").write_bytes(data)
    out = tmp_path / "f.msb"
    modelseal.seal(tmp_path / "f.dat", out, [host.recipient], segment_size=4096)
    with modelseal.open_bundle(out, host) as b:
        for off, n in [(0, 1), (4095, 2), (10_000, 20_000), (49_999, 1), (0, 50_000), (123, 0)]:
            assert bytes(b.read_range("f.dat", off, n)) == data[off : off + n]
        with pytest.raises(UsageError):
            b.read_range("f.dat", 49_000, 2000)


def test_tampered_bundle_segment(tmp_path: Path, host: HpkeIdentity) -> None:
    (tmp_path / "f.dat").write_bytes(os.urandom(20_000))
    out = tmp_path / "f.msb"
    modelseal.seal(tmp_path / "f.dat", out, [host.recipient], segment_size=4096)
    raw = bytearray(out.read_bytes())
    raw[-16 * 5 - 100] ^= 0x40  # inside the last segment's ciphertext
    out.write_bytes(raw)
    with modelseal.open_bundle(out, host) as b:
        assert bytes(b.read_range("f.dat", 0, 100))  # untouched segments still read (random access)
        with pytest.raises(AuthenticationError, match="segment 4"):
            b.read("f.dat")


def test_streaming_seal_and_verify_in_bounded_memory(tmp_path: Path, host: HpkeIdentity) -> None:
    """64 MiB through 1 MiB segments: Python-side peak allocation stays a few segments, not the file."""
    big = tmp_path / "big.dat"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "big.msb"
    tracemalloc.start()
    modelseal.seal(big, out, [host.recipient], segment_size=1 << 20)
    _, peak_seal = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    from modelseal.sealing.operations import verify

    verify(out, host)
    _, peak_verify = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_seal < 16 << 20, peak_seal
    assert peak_verify < 16 << 20, peak_verify
    with modelseal.open_bundle(out, host) as b:
        h = __import__("hashlib").sha256()
        for chunk in b.iter_chunks("big.dat"):
            h.update(chunk)
    assert h.hexdigest() == __import__("hashlib").sha256(big.read_bytes()).hexdigest()


def test_torchscript_and_pt_bundles(tmp_path: Path, host: HpkeIdentity) -> None:
    torch = pytest.importorskip("torch")
    import modelseal.torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    scripted = torch.jit.trace(model.eval(), x)
    scripted.save(str(tmp_path / "model.ts"))
    modelseal.seal(tmp_path / "model.ts", tmp_path / "model.ts.sealed", [host.recipient])
    loaded = modelseal.torch.load_torchscript(tmp_path / "model.ts.sealed", identity=host)
    assert torch.equal(loaded(x), scripted(x))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    modelseal.seal(tmp_path / "w.pt", tmp_path / "w.pt.sealed", [host.recipient], as_bundle=True)
    sd = modelseal.torch.load(tmp_path / "w.pt.sealed", identity=host)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_bundle_header_is_capped_like_safetensors(tmp_path: Path, host: HpkeIdentity) -> None:
    """A valid envelope padded with spaces past 100 MiB was parsed and accepted on ac0b701 (a 305 MiB
    header took the loader to 4.1 GB RSS); the header length is now refused before anything is read."""
    import struct

    from modelseal.errors import FormatError

    (tmp_path / "f.dat").write_bytes(b"weights")
    out = tmp_path / "f.msb"
    modelseal.seal(tmp_path / "f.dat", out, [host.recipient])
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[8:16])
    envelope, rest = raw[16 : 16 + n].rstrip(b" "), raw[16 + n :]
    size = (100 << 20) + 1  # one byte over the safetensors limit
    with open(tmp_path / "big.msb", "wb") as f:
        f.write(b"MSEALBN1" + struct.pack("<Q", size) + envelope)
        f.write(b" " * (size - len(envelope)))
        f.write(rest)
    with pytest.raises(FormatError, match="over the limit"):
        modelseal.read_bytes(tmp_path / "big.msb", identity=host)
    assert bytes(modelseal.read_bytes(out, identity=host)) == b"weights"
