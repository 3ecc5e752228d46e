"""The format layer's seams, in milliseconds: one dtype table, one sealed-directory context manager,
``Artifact.rewrite_header``, the loader's ``prepare`` hook, the in-place writer, and the CLI resolving
a command's identity once."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save as np_save
from safetensors.numpy import save_file

import modelseal
from modelseal import atomicfile
from modelseal.errors import AuthenticationError, NoMatchingIdentityError, UsageError
from modelseal.format.container import Artifact
from modelseal.format.directory import open_directory
from modelseal.format.dtypes import DTYPES
from modelseal.load.artifacts import open_artifact, open_locked
from modelseal.recipients.hpke import KEMS, HpkeIdentity
from modelseal.sealing.operations import Rewrite, rekey

SEG = 4096


def _header_dtype(blob: bytes) -> str:
    (n,) = struct.unpack("<Q", blob[:8])
    return str(json.loads(blob[8 : 8 + n])["t"]["dtype"])


# ------------------------------------------------------------------------------------------ dtypes


def test_the_dtype_table_names_what_safetensors_writes_for_numpy() -> None:
    for d in DTYPES.values():
        if d.numpy is not None:
            arr = np.zeros(3, dtype=d.numpy)
            assert _header_dtype(np_save({"t": arr})) == d.name
            assert arr.dtype.itemsize == d.itemsize


def test_the_dtype_table_names_what_safetensors_writes_for_torch() -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save as torch_save

    checked = 0
    for d in DTYPES.values():
        dtype = getattr(torch, d.torch or "", None)
        if dtype is None:
            continue  # this PyTorch build lacks it; the loader says so
        t = torch.zeros(3, dtype=dtype)
        assert t.element_size() == d.itemsize, d.name
        try:
            blob = torch_save({"t": t})
        except (KeyError, ValueError, TypeError):  # a type this safetensors release cannot write yet
            continue
        assert _header_dtype(blob) == d.name
        checked += 1
    assert checked >= 15


def test_no_module_reads_a_private_safetensors_table() -> None:
    src = Path(modelseal.__file__).parent
    offenders = [p for p in src.rglob("*.py") if "_TYPES" in p.read_text() and "safetensors" in p.read_text()]
    assert offenders == []


# ------------------------------------------------------------------------------- open_directory


@pytest.fixture
def sealed_dir(tmp_path: Path, host: HpkeIdentity) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    save_file({"w": np.arange(3000, dtype=np.float32)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "x"}')
    (src / "sub" / "tok.txt").write_text("a b c\n" * 500)
    modelseal.seal(src, tmp_path / "sealed", [host.recipient], model_id="m", segment_size=SEG)
    return tmp_path / "sealed"


class Recording:
    """An opener that unlocks members and remembers what it opened and the cache it was given."""

    def __init__(self, identity: HpkeIdentity, fail_at: int | None = None) -> None:
        self.identity, self.fail_at = identity, fail_at
        self.opened: list[Artifact] = []
        self.deks: list[bytearray] = []

    def __call__(self, path: Path, cache: dict[bytes, bytearray]) -> Artifact:
        if len(self.opened) == self.fail_at:
            raise UsageError(f"{path}: refused by the test")
        art = open_artifact(path, self.identity, dek_cache=cache)
        self.opened.append(art)
        self.deks = list(cache.values())
        return art


def test_open_directory_shares_one_key_and_wipes_everything(sealed_dir: Path, host: HpkeIdentity) -> None:
    opener = Recording(host)
    with open_directory(sealed_dir, opener) as arts:
        assert sorted(arts) == ["config.json", "model.safetensors", "sub/tok.txt"]
        assert len(opener.deks) == 1  # one unwrap for the whole directory
        assert all(a._dek is not None for a in arts.values())
    assert all(a._dek is None for a in opener.opened)
    assert all(not any(dek) for dek in opener.deks)


def test_open_directory_cleans_up_when_a_member_fails(sealed_dir: Path, host: HpkeIdentity) -> None:
    opener = Recording(host, fail_at=2)
    with pytest.raises(UsageError, match="refused by the test"), open_directory(sealed_dir, opener):
        pytest.fail("the body must not run")
    assert len(opener.opened) == 2 and all(a._dek is None for a in opener.opened)
    assert opener.deks and not any(any(dek) for dek in opener.deks)


def test_open_directory_checks_the_group_before_the_caller_sees_it(
    sealed_dir: Path, tmp_path: Path, host: HpkeIdentity
) -> None:
    other = tmp_path / "other"
    shutil.copytree(sealed_dir, other)
    shutil.rmtree(sealed_dir)
    modelseal.seal(tmp_path / "src", sealed_dir, [host.recipient], model_id="m", segment_size=SEG)
    shutil.copy(other / "config.json", sealed_dir / "config.json")  # a member of another sealing
    opener = Recording(host)
    with pytest.raises(AuthenticationError, match="mixes files"), open_directory(sealed_dir, opener):
        pytest.fail("the body must not run")
    assert all(a._dek is None for a in opener.opened)


# ------------------------------------------------------------------------------- rewrite_header


@pytest.mark.parametrize("kind", ["model.safetensors", "config.json"])
def test_rewrite_header_in_place_then_moved_keeps_the_ciphertext(
    sealed_dir: Path, host: HpkeIdentity, kind: str
) -> None:
    path = sealed_dir / kind
    with open_locked(path) as art:
        offset, end = art.payload_offset, len(path.read_bytes())
    before = path.read_bytes()[offset:end]
    size = path.stat().st_size
    newcomer = HpkeIdentity.generate(KEMS["x25519"])
    assert rekey(path, host, add=[newcomer.recipient])[0].rewritten is Rewrite.IN_PLACE
    assert path.stat().st_size == size and path.read_bytes()[offset:] == before
    big = [HpkeIdentity.generate(KEMS["mlkem768x25519"]).recipient for _ in range(6)]
    assert rekey(path, host, add=big)[0].rewritten is Rewrite.MOVED
    with open_artifact(path, newcomer) as art:
        assert art.payload_offset > offset
        assert path.read_bytes()[art.payload_offset :] == before
        art.verify_payload()


def test_overwrite_at_stays_inside_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    atomicfile.overwrite_at(f, 2, b"ab")
    assert f.read_bytes() == b"01ab456789"
    with pytest.raises(UsageError, match="inside an existing regular file"):
        atomicfile.overwrite_at(f, 9, b"ab")
    (tmp_path / "link").symlink_to(f)
    with pytest.raises(UsageError, match="symbolic link"):
        atomicfile.overwrite_at(tmp_path / "link", 0, b"x")
    assert f.read_bytes() == b"01ab456789"


# --------------------------------------------------------------------------------- prepare hook


def test_the_loader_prepares_each_destination_segment(tmp_path: Path, host: HpkeIdentity) -> None:
    data = np.arange(5 * SEG // 4 + 3, dtype=np.float32)
    save_file({"w": data}, str(tmp_path / "p.safetensors"))
    modelseal.seal(tmp_path / "p.safetensors", tmp_path / "s.safetensors", [host.recipient], segment_size=SEG)
    out = bytearray(data.nbytes)
    seen: list[int] = []
    with open_artifact(tmp_path / "s.safetensors", host) as art:
        art.decrypt_many([(art.entries[0], memoryview(out))], prepare=lambda view: seen.append(len(view)))
    assert sorted(seen) == sorted([SEG] * 5 + [data.nbytes - 5 * SEG])
    assert bytes(out) == data.tobytes()


# ------------------------------------------------------------------------------------- the CLI


def test_a_command_resolves_its_identity_once(
    sealed_dir: Path, host_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelseal.load.artifacts as artifacts
    from modelseal.cli.main import main

    calls: list[object] = []
    real = artifacts.load_identity

    def counting(spec: object, *args: object, **kwargs: object) -> object:
        calls.append(spec)
        return real(spec, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(artifacts, "load_identity", counting)
    result = CliRunner().invoke(main, ["verify", str(sealed_dir), "-i", str(host_key), "--json"])
    assert result.exit_code == 0, result.output
    assert [f["payload"] for f in json.loads(result.output)["files"]] == ["authentic"] * 3
    assert len(calls) == 1


def test_verify_without_a_matching_identity_names_the_first_member(sealed_dir: Path) -> None:
    from modelseal.sealing.operations import verify

    with pytest.raises(NoMatchingIdentityError, match=r"config\.json"):
        verify(sealed_dir, HpkeIdentity.generate(KEMS["x25519"]))
