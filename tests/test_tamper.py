"""Tampering of every kind fails closed with a specific modelseal error, never with wrong weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bench.fuzzlib import rewrite_sealed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import modelseal
import modelseal.numpy
from modelseal.errors import (
    AuthenticationError,
    FormatError,
    ModelsealError,
    NoMatchingIdentityError,
    UnsupportedVersionError,
)
from modelseal.recipients.hpke import KEMS, HpkeIdentity

SEG = 4096
IDENT = HpkeIdentity.generate(KEMS["x25519"])
TENSORS = {
    "a": np.arange(3000, dtype=np.float32),  # 12000 bytes: 3 segments
    "b": np.arange(3000, 6000, dtype=np.float32),  # same size as a, for swaps
    "c": np.arange(10, dtype=np.int16),
}


def seal_to(
    tmp: Path,
    name: str,
    tensors: dict[str, np.ndarray] = TENSORS,
    version: str = "1",
    hidden: bool = False,
    seg: int = SEG,
) -> Path:
    plain = tmp / f"{name}.plain.safetensors"
    save_file(tensors, str(plain))
    out = tmp / f"{name}.safetensors"
    modelseal.seal(
        plain, out, [IDENT.recipient], model_id="m", model_version=version, hide_header=hidden, segment_size=seg
    )
    plain.unlink()
    return out


@pytest.fixture(scope="module")
def sealed_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    return seal_to(d, "public"), seal_to(d, "hidden", hidden=True)


def load_ok_or_error(path: Path) -> dict[str, np.ndarray] | ModelsealError:
    try:
        return modelseal.numpy.load_file(path, identity=IDENT)
    except ModelsealError as exc:
        return exc


def assert_fails_or_exact(result: dict[str, np.ndarray] | ModelsealError) -> None:
    """The only acceptable outcomes: a modelseal error, or exactly the original weights."""
    if isinstance(result, ModelsealError):
        assert str(result)
        return
    assert result.keys() == TENSORS.keys()
    for k, v in TENSORS.items():
        np.testing.assert_array_equal(result[k], v)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte(tmp_path: Path, sealed_pair: tuple[Path, Path], data: st.DataObject) -> None:
    for src in sealed_pair:
        raw = bytearray(src.read_bytes())
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(raw)
        assert_fails_or_exact(load_ok_or_error(bad))


def test_flip_in_ciphertext_and_tags_is_authentication_error(tmp_path: Path, sealed_pair: tuple[Path, Path]) -> None:
    src = sealed_pair[0]
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + n
    for offset in (0, 5000, 12000 + 7, 24000 + 3, 24020 + 5):  # a, a seg 1, b, c, tags
        bad = bytearray(raw)
        bad[data_start + offset] ^= 1
        p = tmp_path / "bad.safetensors"
        p.write_bytes(bad)
        with pytest.raises(AuthenticationError):
            modelseal.numpy.load_file(p, identity=IDENT)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncation_and_appending(tmp_path: Path, sealed_pair: tuple[Path, Path], data: st.DataObject) -> None:
    for src in sealed_pair:
        raw = src.read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1))
        p = tmp_path / "cut.safetensors"
        p.write_bytes(raw[:cut])
        with pytest.raises((FormatError, modelseal.errors.UsageError)):
            modelseal.numpy.load_file(p, identity=IDENT)
        p.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64)))
        with pytest.raises(FormatError, match="trailing"):
            modelseal.numpy.load_file(p, identity=IDENT)


def _data_start(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def test_swapped_tensors(tmp_path: Path, sealed_pair: tuple[Path, Path]) -> None:
    raw = bytearray(sealed_pair[0].read_bytes())
    d = _data_start(raw)
    a, b = raw[d : d + 12000], raw[d + 12000 : d + 24000]
    raw[d : d + 12000], raw[d + 12000 : d + 24000] = b, a
    p = tmp_path / "swapped.safetensors"
    p.write_bytes(raw)
    with pytest.raises(AuthenticationError, match=r"'a'|'b'"):
        modelseal.numpy.load_file(p, identity=IDENT)


def test_swapped_segments_with_their_tags(tmp_path: Path, sealed_pair: tuple[Path, Path]) -> None:
    raw = bytearray(sealed_pair[0].read_bytes())
    d = _data_start(raw)
    tags = d + 24020
    s0, s1 = raw[d : d + SEG], raw[d + SEG : d + 2 * SEG]
    t0, t1 = raw[tags : tags + 16], raw[tags + 16 : tags + 32]
    raw[d : d + SEG], raw[d + SEG : d + 2 * SEG] = s1, s0
    raw[tags : tags + 16], raw[tags + 16 : tags + 32] = t1, t0
    p = tmp_path / "segswap.safetensors"
    p.write_bytes(raw)
    with pytest.raises(AuthenticationError, match="segment"):
        modelseal.numpy.load_file(p, identity=IDENT)


def _with_header(raw: bytes, edit: Callable[[dict], None]) -> bytes:  # type: ignore[type-arg]
    """``raw`` with its safetensors JSON header parsed, edited in place by ``edit``, and re-serialised."""
    d = _data_start(raw)
    header = json.loads(raw[8:d])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(new)) + new + raw[d:]


def test_public_header_edits_are_caught(tmp_path: Path, sealed_pair: tuple[Path, Path]) -> None:
    """Changing a dtype/shape in the plain safetensors listing cannot reinterpret the weights."""
    p = tmp_path / "edited.safetensors"
    p.write_bytes(_with_header(sealed_pair[0].read_bytes(), lambda h: h["a"].update(shape=[1000, 3])))
    with pytest.raises(FormatError, match="disagrees"):
        modelseal.numpy.load_file(p, identity=IDENT)


def _splice_header(header_from: Path, data_from: Path, out: Path) -> None:
    h, dd = header_from.read_bytes(), data_from.read_bytes()
    out.write_bytes(h[: _data_start(h)] + dd[_data_start(dd) :])


def test_header_from_another_version(tmp_path: Path) -> None:
    v1, v2 = seal_to(tmp_path, "v1", version="1"), seal_to(tmp_path, "v2", version="2")
    _splice_header(v1, v2, tmp_path / "mixed.safetensors")
    with pytest.raises(AuthenticationError):
        modelseal.numpy.load_file(tmp_path / "mixed.safetensors", identity=IDENT)


def test_files_swapped_between_models(tmp_path: Path) -> None:
    """A tensor file from model B dropped into model A's sealed directory is refused."""
    rng = np.random.default_rng(3)
    for name in ("A", "B"):
        src = tmp_path / f"src{name}"
        src.mkdir()
        save_file({"w": rng.standard_normal(100).astype(np.float32)}, str(src / "model.safetensors"))
        (src / "config.json").write_text(json.dumps({"name": name}))
        modelseal.seal(src, tmp_path / f"sealed{name}", [IDENT.recipient], model_id="m")
    shutil.copy(tmp_path / "sealedB/config.json", tmp_path / "sealedA/config.json")
    import modelseal.transformers as mt

    with pytest.raises(AuthenticationError, match="different sealed models"):
        mt.load_state_dict(tmp_path / "sealedA", identity=IDENT)


def test_wrong_key(tmp_path: Path, sealed_pair: tuple[Path, Path]) -> None:
    stranger = HpkeIdentity.generate(KEMS["x25519"])
    for src in sealed_pair:
        with pytest.raises(NoMatchingIdentityError, match="sealed to: x25519"):
            modelseal.numpy.load_file(src, identity=stranger)


def test_newer_format_version(tmp_path: Path, sealed_pair: tuple[Path, Path]) -> None:

    def bump_format(header: dict) -> None:  # type: ignore[type-arg]
        env = json.loads(header["__metadata__"]["modelseal"])
        prot = json.loads(modelseal.encoding.b64d(env["protected"]))
        prot["format"] = "modelseal/9"
        env["protected"] = modelseal.encoding.b64e(json.dumps(prot).encode())
        header["__metadata__"]["modelseal"] = json.dumps(env)

    p = tmp_path / "v9.safetensors"
    p.write_bytes(_with_header(sealed_pair[0].read_bytes(), bump_format))
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        modelseal.numpy.load_file(p, identity=IDENT)


def test_plain_safetensors_is_not_mistaken_for_sealed(tmp_path: Path) -> None:
    p = tmp_path / "plain.safetensors"
    save_file(TENSORS, str(p))
    with pytest.raises(FormatError, match="plain safetensors"):
        modelseal.numpy.load_file(p, identity=IDENT)


def test_failed_load_leaves_no_plaintext_in_buffers(tmp_path: Path, sealed_pair: tuple[Path, Path]) -> None:
    """If the last segment fails, earlier decrypted segments are wiped before the error propagates."""
    raw = bytearray(sealed_pair[0].read_bytes())
    d = _data_start(raw)
    raw[d + 11999] ^= 1  # last segment of 'a'
    p = tmp_path / "late.safetensors"
    p.write_bytes(raw)
    from modelseal.load.artifacts import open_artifact
    from modelseal.load.tensors import allocate

    art = open_artifact(p, IDENT)
    entry = art.entry("a")
    [(arr, view)] = allocate([entry], "np")
    with pytest.raises(AuthenticationError):
        art.decrypt_many([(entry, view)])
    assert not arr.any()
    art.close()


# ------------------------------------------------------------------ regression tests of issue 14, items 4 and 11


def test_declared_segment_size_does_not_set_memory(tmp_path: Path, host_key: Path, host: HpkeIdentity) -> None:
    """A re-MACed header declaring 1 GiB segments made verify allocate 1 GiB per thread on ac0b701.

    Buffers now follow the segments that exist (the file's size), not the header's claim; measured in a
    child process as VmHWM (its own peak; ru_maxrss would start from pytest's size, inherited over exec).
    """
    plain = tmp_path / "p.safetensors"
    save_file(TENSORS, str(plain))
    src = tmp_path / "s.safetensors"
    modelseal.seal(plain, src, [host.recipient], segment_size=SEG)
    with modelseal.open_artifact(src, host) as art:
        dek, entries = bytes(art.dek), len(art.entries)

    def huge_segments(prot: dict) -> str:  # type: ignore[type-arg]
        return json.dumps({**prot, "segment_size": 1 << 30, "tag_count": entries})

    raw = rewrite_sealed(src.read_bytes(), dek, protected=huge_segments, relist=True)
    p = tmp_path / "huge-segments.safetensors"
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(raw[: 8 + n + 24020] + raw[8 + n + 24020 : 8 + n + 24020 + 16 * entries])  # tags for 3 segments
    script = (
        "import sys\n"
        "from modelseal.errors import ModelsealError\n"
        "from modelseal.sealing.operations import open_to_disk, verify\n"
        "p, key, out = sys.argv[1:]\n"
        "for run in (lambda: verify(p, key), lambda: open_to_disk(p, out, key)):\n"
        "    try:\n"
        "        run()\n"
        "    except ModelsealError as exc:\n"
        "        print(type(exc).__name__)\n"
        "print(int(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(p), str(host_key), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=120, check=True, env={**os.environ, "MODELSEAL_THREADS": "2"},
    ).stdout.split()
    assert out[:2] == ["AuthenticationError", "AuthenticationError"], out
    assert int(out[2]) < 400, f"peak RSS {out[2]} MiB"


NOT_SEALED = {
    "text": b"hello, this is not a model\n",
    "random": bytes(range(256)) * 20,
    "png": b"\x89PNG\r\n\x1a\n" + bytes(100),
    "json": b'{"a": 1}',
    "empty": b"",
}


@pytest.mark.parametrize("content", NOT_SEALED.values(), ids=NOT_SEALED.keys())
def test_not_sealed_files_say_so(tmp_path: Path, content: bytes) -> None:
    """Every loader, inspect and verify: "X is not a sealed modelseal file", not a safetensors length message."""
    from modelseal.sealing.operations import inspect, verify

    p = tmp_path / "model.safetensors"
    p.write_bytes(content)
    for load in (
        lambda: modelseal.numpy.load_file(p, identity=IDENT),
        lambda: modelseal.open_bundle(p, IDENT),
        lambda: modelseal.safe_open(p, "np", identity=IDENT),
        lambda: inspect(p),
        lambda: verify(p, IDENT),
    ):
        with pytest.raises(FormatError, match=f"^{re.escape(str(p))} is not a sealed modelseal file"):
            load()
    cli = subprocess.run(
        [sys.executable, "-m", "modelseal", "inspect", str(p)], capture_output=True, text=True, timeout=60, check=False
    )
    assert cli.returncode == 1
    assert f"{p} is not a sealed modelseal file" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "Traceback" not in cli.stderr


def test_plain_safetensors_says_not_sealed(tmp_path: Path) -> None:
    p = tmp_path / "plain.safetensors"
    save_file(TENSORS, str(p))
    with pytest.raises(FormatError, match="is not a sealed modelseal file: it is a plain safetensors file"):
        modelseal.numpy.load_file(p, identity=IDENT)


@pytest.fixture
def sealed_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": np.arange(3000, dtype=np.float32)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "x", "hidden": list(range(2000))}))
    modelseal.seal(src, tmp_path / "sealed", [IDENT.recipient], model_id="m", segment_size=SEG)
    return tmp_path / "sealed"


@pytest.mark.parametrize("member", ["model.safetensors", "config.json"])
def test_errors_inside_a_sealed_directory_name_the_member(sealed_dir: Path, member: str) -> None:
    """A damaged segment of one member: the error names that file (on ac0b701 it named only the entry)."""
    import modelseal.transformers as mt
    from modelseal.sealing.operations import verify

    raw = bytearray((sealed_dir / member).read_bytes())
    raw[-16 * 3 - 10] ^= 1  # ciphertext of the last segment
    (sealed_dir / member).write_bytes(raw)
    decrypts_member = (
        (lambda: mt.load_state_dict(sealed_dir, identity=IDENT, framework="np"))
        if member == "model.safetensors"
        else (lambda: mt.load_config(sealed_dir, identity=IDENT))
    )
    for load in (decrypts_member, lambda: verify(sealed_dir, IDENT)):
        with pytest.raises(AuthenticationError) as info:
            load()
        assert str(sealed_dir / member) in str(info.value)


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Attack run 2: `modelseal inspect FIFO` blocked forever reading the header."""
    from modelseal.load.artifacts import open_locked

    fifo = tmp_path / "model.sealed.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        open_locked(fifo)
