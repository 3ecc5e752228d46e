"""The CLI as a user runs it: real subprocesses, exit codes, JSON, no tracebacks, no secrets in output.

Every command's ``--help`` and click's usage errors are checked in process, in test_cli_help.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import make_tensors

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier


def ms(*args: str | Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "modelseal.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    host = json.loads(ms("keygen", "-o", tmp_path / "host.key", "--json").stdout)
    pq = json.loads(ms("keygen", "--kind", "mlkem768x25519", "-o", tmp_path / "pq.key", "--json").stdout)
    sign = json.loads(ms("keygen", "--signing", "-o", tmp_path / "owner.sign", "--json").stdout)
    other = json.loads(ms("keygen", "-o", tmp_path / "other.key", "--json").stdout)
    assert oct((tmp_path / "host.key").stat().st_mode & 0o777) == "0o600"
    return {"host": host["public"], "pq": pq["public"], "sign": sign["public"], "other": other["public"]}


def test_full_cli_flow(tmp_path: Path, keys: dict[str, str]) -> None:
    plain = tmp_path / "m.safetensors"
    save_file(make_tensors(), str(plain))
    sealed = tmp_path / "m.sealed.safetensors"
    out = json.loads(
        ms(
            "seal",
            plain,
            "-o",
            sealed,
            "-r",
            keys["host"],
            "-r",
            keys["pq"],
            "--model-id",
            "demo",
            "--model-version",
            "3",
            "--sign-key",
            tmp_path / "owner.sign",
            "--json",
        ).stdout
    )
    assert out["outputs"][0]["signed"] and out["model_version"] == "3"

    info = json.loads(ms("inspect", sealed, "--json").stdout)
    assert info["model_id"] == "demo" and {t["name"] for t in info["tensors"]} == set(make_tensors())
    assert [r["type"] for r in info["recipients"]] == ["x25519", "mlkem768x25519"]
    assert info["signer"] == keys["sign"]

    ok = json.loads(ms("verify", sealed, "-i", tmp_path / "pq.key", "--trusted-signer", keys["sign"], "--json").stdout)
    assert ok["ok"] and ok["files"][0]["payload"] == "authentic"
    # the signature can be checked with no key at all
    ms("verify", sealed, "--trusted-signer", tmp_path / "owner.sign")

    bad = ms("verify", sealed, "-i", tmp_path / "other.key", check=False)
    assert bad.returncode == 1 and "none of your identities" in bad.stderr
    wrong_signer = ms(
        "verify",
        sealed,
        "-i",
        tmp_path / "host.key",
        "--trusted-signer",
        keys["host"].replace("x25519", "ed25519"),
        check=False,
    )
    assert wrong_signer.returncode == 1

    ms("open", sealed, "-i", tmp_path / "host.key", "-o", tmp_path / "opened.safetensors")
    from safetensors.numpy import load_file

    opened = load_file(str(tmp_path / "opened.safetensors"))
    for k, v in make_tensors().items():
        np.testing.assert_array_equal(opened[k], v)

    rk = json.loads(
        ms(
            "rekey",
            sealed,
            "-i",
            tmp_path / "host.key",
            "--add-recipient",
            keys["other"],
            "--remove-recipient",
            keys["host"],
            "--json",
        ).stdout
    )
    assert rk[0]["rewritten"] == "header only"
    ms("verify", sealed, "-i", tmp_path / "other.key", "--trusted-signer", keys["sign"])  # signature survives rekey
    assert ms("verify", sealed, "-i", tmp_path / "host.key", check=False).returncode == 1


def test_errors_are_one_line_and_leak_no_secret(tmp_path: Path, keys: dict[str, str]) -> None:
    plain = tmp_path / "m.safetensors"
    save_file(make_tensors(), str(plain))
    sealed = tmp_path / "s.safetensors"
    ms("seal", plain, "-o", sealed, "-r", keys["host"])
    raw = bytearray(sealed.read_bytes())
    raw[-40] ^= 1
    sealed.write_bytes(raw)
    secret = (tmp_path / "host.key").read_text().strip().splitlines()[-1].split(":", 1)[1]
    proc = ms("verify", sealed, "-i", tmp_path / "host.key", check=False)
    assert proc.returncode == 1 and "failed authentication" in proc.stderr
    assert secret not in proc.stderr + proc.stdout
    for args in (
        ["seal", plain, "-o", tmp_path / "x", "-r", "x25519:notbase64!"],
        ["seal", plain, "-o", tmp_path / "x"],
        ["open", sealed, "-o", tmp_path / "y"],
        ["inspect", plain],
        ["verify", sealed, "-i", plain],
    ):
        proc = ms(*args, check=False, env={"MODELSEAL_IDENTITY": ""})
        assert proc.returncode in (1, 2), args
        assert proc.stderr.strip() and secret not in proc.stderr
    assert not (tmp_path / "y").exists()


def test_passphrase_and_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save_file(make_tensors(), str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    env = {"PW": "hunter2 hunter2"}
    ms("seal", src, "-o", tmp_path / "sealed", "--passphrase-env", "PW", "--hide-header", env=env)
    rep = json.loads(ms("verify", tmp_path / "sealed", "--passphrase-env", "PW", "--json", env=env).stdout)
    assert len(rep["files"]) == 2
    ms("open", tmp_path / "sealed", "--passphrase-env", "PW", "-o", tmp_path / "out", env=env)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    wrong = ms("verify", tmp_path / "sealed", "--passphrase-env", "PW", check=False, env={"PW": "nope"})
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr


def test_demo_json(tmp_path: Path) -> None:
    rep = json.loads(ms("demo", "--workdir", tmp_path / "d", "--json").stdout)
    assert rep["identical_to_plain"] is True
    assert rep["usage"] == {"licence": "demo-licence", "requests": 1, "items": 1}  # metered through a renewal
    assert "revoked" in rep["after_revocation"]


# ------------------------------------------------------------- issue 14 item 11: the error promise


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str | Path) -> None:
    """Exit 1 and exactly one ``modelseal: error:`` line that names what it is about."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("modelseal: error:") and "\n" not in err, err
    for n in needles:
        assert str(n) in err, err


def strays(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial" in p.name]


def test_missing_inputs_are_one_line_errors(tmp_path: Path, keys: dict[str, str]) -> None:
    """ac0b701: click's 4-line usage error and exit 2."""
    missing = tmp_path / "nope.safetensors"
    commands: list[list[str | Path]] = [
        ["seal", missing, "-o", tmp_path / "x", "-r", keys["host"]],
        ["inspect", missing],
        ["verify", missing, "-i", tmp_path / "host.key"],
        ["open", missing, "-i", tmp_path / "host.key", "-o", tmp_path / "y"],
        ["rekey", missing, "-i", tmp_path / "host.key", "--add-recipient", keys["other"]],
    ]
    for args in commands:
        one_line_error(ms(*args, check=False), missing)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_empty_directory_is_an_error(tmp_path: Path, keys: dict[str, str]) -> None:
    """ac0b701: verify and inspect of an empty directory printed nothing and exited 0."""
    empty = tmp_path / "empty"
    empty.mkdir()
    commands: list[list[str | Path]] = [
        ["inspect", empty],
        ["verify", empty, "-i", tmp_path / "host.key"],
        ["open", empty, "-i", tmp_path / "host.key", "-o", tmp_path / "out"],
        ["rekey", empty, "-i", tmp_path / "host.key", "--add-recipient", keys["other"]],
    ]
    for args in commands:
        one_line_error(ms(*args, check=False), f"no sealed files in {empty}")


def test_seal_output_rules(tmp_path: Path, keys: dict[str, str]) -> None:
    """Missing parent (files and directories alike), a directory in the way, no overwrite without --force."""
    plain = tmp_path / "m.safetensors"
    save_file(make_tensors(), str(plain))
    src = tmp_path / "model"
    src.mkdir()
    save_file(make_tensors(1), str(src / "w.safetensors"))
    host = keys["host"]
    nowhere = tmp_path / "no" / "such"
    one_line_error(ms("seal", plain, "-o", nowhere / "m.sealed", "-r", host, check=False), nowhere, "does not exist")
    one_line_error(ms("seal", src, "-o", nowhere / "sealed", "-r", host, check=False), nowhere, "does not exist")
    assert not (tmp_path / "no").exists()  # ac0b701 created the parents of a directory output

    (tmp_path / "adir").mkdir()
    adir = ms("seal", plain, "-o", tmp_path / "adir", "-r", host, "--force", check=False)
    one_line_error(adir, tmp_path / "adir", "directory")  # ac0b701: IsADirectoryError traceback

    sealed = tmp_path / "m.sealed"
    ms("seal", plain, "-o", sealed, "-r", host)
    first = sealed.read_bytes()
    one_line_error(ms("seal", plain, "-o", sealed, "-r", host, check=False), sealed, "--force")
    assert sealed.read_bytes() == first  # ac0b701 overwrote it silently
    ms("seal", plain, "-o", sealed, "-r", host, "--force")
    assert sealed.read_bytes() != first

    (tmp_path / "out").mkdir()  # an empty directory may receive a sealed directory
    ms("seal", src, "-o", tmp_path / "out", "-r", host)
    one_line_error(ms("seal", src, "-o", tmp_path / "out", "-r", host, check=False), tmp_path / "out", "--force")
    ms("seal", src, "-o", tmp_path / "out", "-r", host, "--force")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["w.safetensors"]
    assert not strays(tmp_path)


def test_keygen_writes_the_public_file(tmp_path: Path) -> None:
    """`keygen -o host.key` also writes host.pub, which `seal -r host.pub` reads (the README's example)."""
    rep = json.loads(ms("keygen", "-o", tmp_path / "host.key", "--json").stdout)
    pub = tmp_path / "host.pub"
    assert rep["file"] == str(tmp_path / "host.key") and rep["public_file"] == str(pub)
    assert pub.read_text().splitlines()[-1] == rep["public"]
    secret = (tmp_path / "host.key").read_text().splitlines()[-1].split(":", 1)[1]
    assert secret not in pub.read_text()
    plain = tmp_path / "m.safetensors"
    save_file(make_tensors(), str(plain))
    ms("keygen", "--signing", "-o", tmp_path / "owner.sign")
    ms("seal", plain, "-o", tmp_path / "m.sealed", "-r", pub, "--sign-key", tmp_path / "owner.sign")
    ms("verify", tmp_path / "m.sealed", "-i", tmp_path / "host.key", "--trusted-signer", tmp_path / "owner.pub")

    for existing in ("host.key", "host.pub"):
        (tmp_path / "fresh.key").unlink(missing_ok=True)
        (tmp_path / "fresh.pub").unlink(missing_ok=True)
        (tmp_path / existing.replace("host", "fresh")).write_text("keep")
        proc = ms("keygen", "-o", tmp_path / "fresh.key", check=False)
        one_line_error(proc, tmp_path / existing.replace("host", "fresh"), "--force")
        assert sorted(p.name for p in tmp_path.glob("fresh.*")) == [existing.replace("host", "fresh")]
    again = json.loads(ms("keygen", "-o", tmp_path / "host.key", "--force", "--json").stdout)
    assert again["public"] != rep["public"] and pub.read_text().splitlines()[-1] == again["public"]
    sym = json.loads(ms("keygen", "--symmetric", "-o", tmp_path / "sym.key", "--json").stdout)
    assert sym["public_file"] is None and not (tmp_path / "sym.pub").exists()
    one_line_error(ms("keygen", "-o", tmp_path / "x.pub", check=False), "x.pub")
    one_line_error(ms("keygen", "-o", ".", check=False), "does not name a file")
    assert not strays(tmp_path)
