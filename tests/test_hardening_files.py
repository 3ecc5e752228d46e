"""Issue 14, item 3: no plaintext (or any other partial output) is left on disk after a failure.

Every output goes through :mod:`modelseal.atomicfile`. These tests attack it the way a hostile
co-tenant or plain bad luck would: a tampered member in the middle of a directory, a full disk
(RLIMIT_FSIZE in a subprocess), SIGINT/SIGTERM while a big file is written, ``--force`` onto a
directory, symbolic links planted at the output path, inside the output directory and at the
temporary name, and they check that what is written is fsync'd with its directory.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
from modelseal import atomicfile
from modelseal.crypto.keys import new_dek
from modelseal.errors import AuthenticationError, ModelsealError, UsageError
from modelseal.format import bundle
from modelseal.load.artifacts import open_locked
from modelseal.recipients.hpke import KEMS, HpkeIdentity
from modelseal.sealing.operations import open_to_disk, rekey
from tests.conftest import make_tensors

SEGMENT = 64 * 1024


# ------------------------------------------------------------------------------------------ helpers


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (links as ``->target``), with file contents: a before/after snapshot."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"->{os.readlink(p)}".encode()
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = None
    return out


def no_temp_names(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".partial" in p.name or p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


def cli(*args: str | Path, preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "modelseal.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec,
        env={**os.environ, "MODELSEAL_IDENTITY": ""},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("modelseal: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The directory outputs go into; nothing else is ever in it, so any stray file shows."""
    p = tmp_path / "work"
    p.mkdir()
    return p


@pytest.fixture
def sealed_dir(tmp_path: Path, host: HpkeIdentity) -> Path:
    """A sealed model directory: a.safetensors, sub/b.safetensors and z.json (sealed last)."""
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    save_file(make_tensors(0), str(src / "a.safetensors"))
    save_file(make_tensors(1), str(src / "sub" / "b.safetensors"))
    (src / "z.json").write_bytes(os.urandom(3 * SEGMENT))
    modelseal.seal(src, tmp_path / "sealed", [host.recipient], segment_size=SEGMENT)
    return tmp_path / "sealed"


@pytest.fixture
def sealed_file(tmp_path: Path, host: HpkeIdentity) -> Path:
    plain = tmp_path / "m.safetensors"
    save_file({"w": np.arange(300_000, dtype=np.float32)}, str(plain))  # 1.2 MB, ~19 segments
    modelseal.seal(plain, tmp_path / "m.sealed", [host.recipient], segment_size=SEGMENT)
    return tmp_path / "m.sealed"


def flip_last_segment(path: Path) -> None:
    """Flip a ciphertext bit of a payload's last segment: headers stay valid, decryption fails late."""
    with open_locked(path) as art:
        end = art.payload_offset + art.payload_size
    raw = bytearray(path.read_bytes())
    raw[end - 10] ^= 0x01
    path.write_bytes(raw)


# ------------------------------------------------------------------------- failures in the middle


def test_tampered_last_member_leaves_nothing(work: Path, sealed_dir: Path, host_key: Path) -> None:
    """The first members decrypt and are written; the last fails authentication: none of them stays."""
    flip_last_segment(sealed_dir / "z.json")
    with pytest.raises(AuthenticationError):
        open_to_disk(sealed_dir, work / "out", host_key)
    assert tree(work) == {}
    proc = cli("open", sealed_dir, "-i", host_key, "-o", work / "out")
    one_line_error(proc, "z.json")
    assert tree(work) == {}


def test_tampered_entry_of_directory_bundle_leaves_nothing(work: Path, tmp_path: Path, host: HpkeIdentity) -> None:
    """A bundle of a directory whose third file fails: the two already written must go too (ac0b701 kept them)."""
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.bin", "sub/c.bin"):
        (src / name).write_bytes(os.urandom(2 * SEGMENT))
    sealed = tmp_path / "tree.msb"
    bundle.seal_path(src, sealed, [host.recipient], builder=bundle.new_builder("m", "1", new_dek(), SEGMENT))
    flip_last_segment(sealed)
    before = tree(work)
    with pytest.raises(AuthenticationError):
        open_to_disk(sealed, work / "out", host)
    assert tree(work) == before == {}


def test_wrong_key_for_one_member_leaves_nothing(work: Path, sealed_dir: Path, host: HpkeIdentity) -> None:
    """A member re-sealed for someone else (same path, other key): refused before or while writing, no trace."""
    stranger = HpkeIdentity.generate(KEMS["x25519"])
    plain = work.parent / "other.safetensors"
    save_file(make_tensors(7), str(plain))
    (sealed_dir / "sub" / "b.safetensors").unlink()
    modelseal.seal(plain, sealed_dir / "sub" / "b.safetensors", [stranger.recipient])
    with pytest.raises(ModelsealError):
        open_to_disk(sealed_dir, work / "out", host)
    assert tree(work) == {}


@pytest.mark.parametrize("command", ["open", "seal"])
def test_full_disk_leaves_nothing(work: Path, tmp_path: Path, sealed_file: Path, host_key: Path, command: str) -> None:
    """RLIMIT_FSIZE makes writes past 256 KiB fail (EFBIG) as on a full disk: one line, exit 1, no stray."""
    limit = 256 * 1024

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if command == "open":
        proc = cli("open", sealed_file, "-i", host_key, "-o", work / "plain.safetensors", preexec=small_disk)
        one_line_error(proc, str(work / "plain.safetensors"))
    else:
        proc = cli("seal", tmp_path / "m.safetensors", "-o", work / "m.sealed", "-r", host_key, preexec=small_disk)
        one_line_error(proc, str(work / "m.sealed"))
    assert tree(work) == {}


# ------------------------------------------------------------------------------------- signals

SIGNAL_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    # as a fresh login would have them: a test run started under nohup passes SIGHUP on ignored
    for name in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGALRM"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    from modelseal.sealing.operations import open_to_disk
    from modelseal.sealing.writer import seal

    what, src, out, key, ready = sys.argv[1:]
    first = True

    def progress(n):  # after the first chunk is written: tell the test, then wait for its signal
        global first
        if first:
            first = False
            Path(ready).write_text("writing")
            time.sleep(60)

    try:
        if what == "open":
            open_to_disk(src, out, key, progress=progress)
        else:
            seal(src, out, [Path(key).with_suffix(".pub").read_text().split()[-1]], progress=progress)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(3)  # not interrupted: the test failed to signal in time
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM])
@pytest.mark.parametrize("what", ["open", "seal"])
def test_signal_mid_write_leaves_nothing(
    work: Path, tmp_path: Path, sealed_dir: Path, host: HpkeIdentity, host_key: Path, what: str, signum: int
) -> None:
    """Interrupted while a directory is half written: SIGINT exits 130, the others die of the signal; no trace.
    (SIGHUP, a dropped ssh session, left the plaintext behind after the first fix: found by an attack run.)"""
    host_key.with_suffix(".pub").write_text(host.recipient.describe() + "\n")
    src = sealed_dir if what == "open" else tmp_path / "model"
    ready = tmp_path / "ready"
    env = {**os.environ, "MODELSEAL_THREADS": "1"}  # progress runs on the main thread, where signals land
    child = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_CHILD, what, str(src), str(work / "out"), str(host_key), str(ready)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert list(work.iterdir()), "the child should be writing by now"
        child.send_signal(signum)
        rc = child.wait(30)
    finally:
        child.kill()
    assert rc == (130 if signum == signal.SIGINT else -signum)
    assert tree(work) == {}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_signal_while_opening_big_file(work: Path, tmp_path: Path, host: HpkeIdentity, signum: int) -> None:
    """The real CLI opening a 256 MiB model, signalled as soon as its temporary file appears."""
    plain = tmp_path / "big.safetensors"
    save_file({"w": np.zeros(64 << 20, dtype=np.float32)}, str(plain))
    sealed = tmp_path / "big.sealed"
    modelseal.seal(plain, sealed, [host.recipient])
    plain.unlink()
    key = tmp_path / "host.key"
    host.save(key)
    child = subprocess.Popen(
        [sys.executable, "-m", "modelseal.cli.main", "open", str(sealed), "-i", str(key), "-o", str(work / "big")],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in work.iterdir()):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        child.send_signal(signum)
        rc = child.wait(30)
    finally:
        child.kill()
    assert rc == (130 if signum == signal.SIGINT else -signal.SIGTERM)
    assert child.stderr is not None and "Traceback" not in child.stderr.read()
    assert tree(work) == {}


# ------------------------------------------------------------------------------ --force and links


def test_open_force_onto_directory_is_refused_cleanly(work: Path, sealed_file: Path, host_key: Path) -> None:
    """ac0b701 wrote the whole plaintext to .NAME.partial-PID, failed to rename it over the directory, kept it."""
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    before = tree(work)
    proc = cli("open", sealed_file, "-i", host_key, "-o", work / "out", "--force")
    one_line_error(proc, str(work / "out"), "directory")
    assert tree(work) == before


def test_open_force_replaces_a_directory_whole(work: Path, sealed_dir: Path, host_key: Path) -> None:
    """--force onto an existing model directory: the old files go, the new tree arrives whole, no trace."""
    out = work / "out"
    (out / "sub").mkdir(parents=True)
    (out / "stale.bin").write_text("old plaintext")
    (out / "sub" / "b.safetensors").write_text("old")
    refused = cli("open", sealed_dir, "-i", host_key, "-o", out)
    one_line_error(refused, str(out), "--force")
    assert (out / "stale.bin").read_text() == "old plaintext"
    proc = cli("open", sealed_dir, "-i", host_key, "-o", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(tree(out)) == ["a.safetensors", "sub", "sub/b.safetensors", "z.json"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((out / f).stat().st_mode) == 0o600 for f in ("a.safetensors", "z.json"))
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_open_onto_its_own_input_is_refused(sealed_dir: Path, sealed_file: Path, host: HpkeIdentity) -> None:
    """--force must not let the plaintext replace (and so delete) the sealed files it is read from."""
    for src, out in ((sealed_dir, sealed_dir), (sealed_dir, sealed_dir / "sub"), (sealed_file, sealed_file),
                     (sealed_dir, sealed_dir.parent), (sealed_file, sealed_file.parent)):  # fmt: skip
        before = tree(src.parent)
        with pytest.raises(UsageError, match="must lie outside the input"):
            open_to_disk(src, out, host, force=True)
        assert tree(src.parent) == before


def test_seal_onto_an_ancestor_of_its_input_is_refused(tmp_path: Path, host: HpkeIdentity) -> None:
    """Attack run 2: `seal P/hf -o P --force` replaced P, deleting the plaintext being sealed."""
    model = tmp_path / "parent" / "hf"
    model.mkdir(parents=True)
    save_file({"w": np.ones(4, np.float32)}, str(model / "model.safetensors"))
    before = tree(tmp_path)
    for out in (tmp_path / "parent", model, model / "inside"):
        with pytest.raises(UsageError, match="must lie outside the input"):
            modelseal.seal(model, out, [host.recipient], force=True)
        assert tree(tmp_path) == before


def test_force_does_not_follow_a_link_inside_the_output(
    work: Path, tmp_path: Path, sealed_dir: Path, host_key: Path
) -> None:
    """A link planted at out/sub -> victim/: ac0b701 wrote sub/b.safetensors into the victim's directory."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("do not touch")
    out = work / "out"
    out.mkdir()
    (out / "sub").symlink_to(victim, target_is_directory=True)
    proc = cli("open", sealed_dir, "-i", host_key, "-o", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert tree(victim) == {"precious": b"do not touch"}
    assert not (out / "sub").is_symlink() and (out / "sub" / "b.safetensors").is_file()
    no_temp_names(tmp_path)


@pytest.mark.parametrize("command", ["open", "seal", "keygen"])
def test_link_at_the_output_path_is_refused(
    work: Path, tmp_path: Path, sealed_file: Path, host_key: Path, command: str
) -> None:
    """-o LINK --force: refused with one line; neither the link nor its target changes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    link = work / "out"
    link.symlink_to(victim)
    commands: dict[str, list[str | Path]] = {
        "open": ["open", sealed_file, "-i", host_key],
        "seal": ["seal", tmp_path / "m.safetensors", "-r", host_key],
        "keygen": ["keygen", "--symmetric"],
    }
    proc = cli(*commands[command], "-o", link, "--force")
    one_line_error(proc, str(link), "symbolic link")
    assert victim.read_text() == "do not touch" and os.readlink(link) == str(victim)
    assert sorted(p.name for p in work.iterdir()) == ["out"]


@pytest.mark.parametrize("what", ["open", "seal", "key"])
def test_link_at_the_old_temporary_name_is_not_followed(
    work: Path, tmp_path: Path, sealed_file: Path, host: HpkeIdentity, what: str
) -> None:
    """ac0b701 opened .NAME.partial-PID with O_CREAT|O_TRUNC, following a link planted there: the victim
    file was overwritten (with plaintext, for open). Temporary names are unpredictable and O_EXCL now."""
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    out = work / "out"
    for name in (f".out.partial-{os.getpid()}", f".out.rekey-{os.getpid()}", "out.tmp"):
        (work / name).symlink_to(victim)
    if what == "open":
        open_to_disk(sealed_file, out, host)
    elif what == "seal":
        modelseal.seal(tmp_path / "m.safetensors", out, [host.recipient])
    else:
        host.save(out)
    assert victim.read_bytes() == b"do not touch"
    assert out.is_file() and not out.is_symlink()


def test_seal_directory_is_all_or_nothing(work: Path, tmp_path: Path, host: HpkeIdentity) -> None:
    """A member that cannot be sealed (a checkpoint that is not one) fails the directory: nothing is left."""
    src = tmp_path / "model"
    src.mkdir()
    save_file(make_tensors(), str(src / "a.safetensors"))
    (src / "b.safetensors").write_bytes(b"\xff" * 64)  # not safetensors: fails after a.safetensors is sealed
    with pytest.raises(ModelsealError):
        modelseal.seal(src, work / "sealed", [host.recipient])
    assert tree(work) == {}


def test_an_interrupted_rekey_of_a_directory_is_finished_by_running_it_again(
    sealed_dir: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation that stopped halfway (attack run 2: a full disk at the third member) must be
    completable: ac0b701 and the first fix refused the rerun ("no stanza matches") and left the weights
    open to the revoked key. Now the failure names what was rewritten, and the same command finishes."""
    from modelseal.format.container import Artifact
    from modelseal.sealing.operations import Rewrite

    revoked = HpkeIdentity.generate(KEMS["x25519"])
    rekey(sealed_dir, host, add=[revoked.recipient])
    real, calls = Artifact.rewrite_header, []

    def disk_full_at_the_second(art: Any) -> bool:
        calls.append(art.path)
        if len(calls) == 2:
            raise atomicfile.WriteError(f"cannot write {art.path}: File too large")
        return real(art)

    monkeypatch.setattr(Artifact, "rewrite_header", disk_full_at_the_second)
    with pytest.raises(ModelsealError, match=r"already rewritten: .*run the same command again to finish"):
        rekey(sealed_dir, host, remove=[revoked.recipient])
    monkeypatch.setattr(Artifact, "rewrite_header", real)
    reports = rekey(sealed_dir, host, remove=[revoked.recipient])  # the same command again
    assert [r.removed for r in reports].count(0) == 1  # the member done the first time is left as it is
    assert any(r.rewritten is Rewrite.UNCHANGED for r in reports)
    for member in reports:
        with pytest.raises(ModelsealError):
            open_locked(member.file).unlock(revoked)
    with pytest.raises(UsageError, match="no stanza matches"):  # nothing left to remove anywhere
        rekey(sealed_dir, host, remove=[revoked.recipient])
    assert len(open_locked(reports[0].file).envelope.recipients) == 1
    rekey(sealed_dir, host, add=[host.recipient])  # adding a recipient already present adds nothing
    assert len(open_locked(reports[0].file).envelope.recipients) == 1


# ------------------------------------------------------------------------------------------ fsync


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, bool]]]:
    """Record (device, inode, is_directory) of every fsync'd fd, then really fsync it."""
    seen: list[tuple[int, int, bool]] = []
    real = os.fsync

    def counting(fd: int) -> None:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    yield seen


def synced(path: Path, seen: list[tuple[int, int, bool]]) -> bool:
    st = path.stat()
    return (st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)) in seen


@pytest.mark.parametrize("what", ["open", "open-dir", "seal", "seal-dir", "key", "master-key", "rekey"])
def test_outputs_are_fsynced_with_their_directory(
    work: Path,
    tmp_path: Path,
    sealed_file: Path,
    sealed_dir: Path,
    host: HpkeIdentity,
    fsyncs: list[tuple[int, int, bool]],
    what: str,
) -> None:
    """The file's data and the directory entry that names it both reach the disk (ac0b701: open did neither)."""
    out = work / "out"
    if what == "open":
        open_to_disk(sealed_file, out, host)
    elif what == "open-dir":
        open_to_disk(sealed_dir, out, host)
    elif what == "seal":
        modelseal.seal(tmp_path / "m.safetensors", out, [host.recipient])
    elif what == "seal-dir":
        modelseal.seal(tmp_path / "model", out, [host.recipient])
    elif what == "key":
        host.save(out)
    elif what == "master-key":
        from modelseal.keyserver.masterkey import LocalMasterKey

        LocalMasterKey.create(out).rotate()
    else:
        out = sealed_file
        work = sealed_file.parent
        big = [HpkeIdentity.generate(KEMS["mlkem768x25519"]).recipient for _ in range(6)]  # header must move
        assert rekey(out, host, add=big)[0].rewritten == "header moved"
    assert synced(work, fsyncs), "the directory holding the output was not fsync'd"
    files = [p for p in [out, *out.rglob("*")] if p.is_file()] if out.is_dir() else [out]
    assert files and all(synced(f, fsyncs) for f in files)
    if out.is_dir():
        assert all(synced(d, fsyncs) for d in [out, *out.rglob("*")] if d.is_dir())


@pytest.mark.parametrize("planted", ["host.key", "host.pem"])
def test_pki_issue_does_not_write_through_a_planted_link(tmp_path: Path, planted: str) -> None:
    """ac0b701 opened NAME.key with O_TRUNC (no O_NOFOLLOW) and wrote NAME.pem with write_bytes: both followed
    a link, so `pki issue --force` overwrote whatever file the link named with a private key or certificate."""
    from modelseal import pki

    pki.init_ca(tmp_path / "ca")
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    (tmp_path / "ca" / planted).symlink_to(victim)
    with pytest.raises(ModelsealError, match="symbolic link"):
        pki.issue(tmp_path / "ca", "host", force=True)
    assert victim.read_text() == "do not touch"
    assert not [p.name for p in (tmp_path / "ca").iterdir() if p.name.endswith(".partial")]


def test_a_file_cut_short_after_it_was_opened_is_a_clean_error(tmp_path: Path, host: HpkeIdentity) -> None:
    """The sealed file is read with pread only (no mapping, which would SIGBUS on the missing pages): a
    file truncated between open and load is a FormatError naming it, and no tensor is returned."""
    from modelseal.errors import FormatError
    from modelseal.load.artifacts import open_artifact
    from modelseal.load.tensors import decrypt_tensors

    plain, sealed = tmp_path / "p.safetensors", tmp_path / "s.safetensors"
    save_file({"w": np.arange(1 << 18, dtype=np.float32)}, str(plain))
    modelseal.seal(plain, sealed, [host.recipient])
    with open_artifact(sealed, host) as art:
        os.truncate(sealed, art.payload_offset + 4096)
        with pytest.raises(FormatError, match="shorter than its header says"):
            decrypt_tensors(art, art.entries, "np")  # type: ignore[arg-type]
