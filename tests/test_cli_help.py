"""Every command's ``--help`` and the usage-error promise, in process through click's runner.

The command tree is walked, so a command added later is covered without touching this file; what each help
must name (the variables a command reads, the files it writes) is a table here, the contract. Two subprocesses
check that ``python -m modelseal`` and the console script start at all (imports, registration, no traceback);
the rest runs in milliseconds, in the fast tier. What the commands *do* is tested as a user runs them, in
subprocesses, in test_cli.py and test_keyserver_cli.py.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from modelseal.cli.helptext import ENVIRONMENT, LIBRARY_ENVIRONMENT
from modelseal.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
# What the README and docs/ tell users to run; main.py registers the service commands apart from the
# core ones (and `serve` only if its module imports), so a registration that silently failed shows here.
DOCUMENTED = {"keygen", "seal", "inspect", "verify", "open", "rekey", "demo", "keyserver", "agent", "pki",
              "attest", "serve", "bench", "trace", "fingerprint"}  # fmt: skip


def walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group under ``command``, with the words that reach it."""
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from walk(command.commands[name], (*path, name))


TREE = list(walk(main))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="modelseal")


@pytest.mark.parametrize(("path", "command"), TREE, ids=[" ".join(p) or "modelseal" for p, _ in TREE])
def test_every_command_has_help(path: tuple[str, ...], command: click.Command) -> None:
    result = invoke(*path, "--help")
    where = " ".join(("modelseal", *path))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {where} "), result.output
    assert command.help and command.help.strip(), f"`{where}` has no help text"
    assert command.get_short_help_str(limit=45).rstrip(".") in " ".join(result.output.split())
    bare = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert not bare, f"`{where}` options without help: {bare}"


# --- the contract: which environment variables each command reads ----------------------------------------
# Its help's "Environment:" list names exactly these; a command not listed reads none. Found by following
# every os.environ read in src/modelseal from each command: the identity resolver (load/artifacts.py), the
# admin client (release/client.py, also behind -r keyserver:...), crypto/parallel.py's thread count,
# memory/arena.py's load tuning, the transit master key (keyserver/config.py), click's envvar= options.
# VAR stands for a variable the command line names (--passphrase-env VAR, -i env:VAR).
IDENTITY = {"MODELSEAL_IDENTITY", "MODELSEAL_AGENT_SOCKET"}
ADMIN = {"MODELSEAL_KEYSERVER_URL", "MODELSEAL_KEYSERVER_CA", "MODELSEAL_ADMIN_TOKEN", "MODELSEAL_ADMIN_TOKEN_FILE"}
KEYSERVER_RECIPIENT = ADMIN - {"MODELSEAL_KEYSERVER_URL"}  # -r keyserver:URL#MODEL carries its URL
REMOTE = {"MODELSEAL_REMOTE_CONCURRENCY", "MODELSEAL_REMOTE_PART_SIZE", "MODELSEAL_REMOTE_RETRIES",
          "MODELSEAL_REMOTE_TIMEOUT", "MODELSEAL_HTTP_BEARER_TOKEN", "MODELSEAL_HTTP_TOKEN_FILE",
          "MODELSEAL_HTTP_TOKEN_HOSTS", "MODELSEAL_HTTP_CLIENT_CERT", "MODELSEAL_HTTP_CLIENT_KEY",
          "MODELSEAL_HTTP_CA_BUNDLE"}  # pointer files
READS: dict[str, set[str]] = {
    "seal": {"MODELSEAL_THREADS", "VAR", "MODELSEAL_REMOTE_PART_SIZE", "MODELSEAL_REMOTE_CONCURRENCY"}
    | KEYSERVER_RECIPIENT,  # the last two: -o s3://... (sealing/remote.py)
    "verify": IDENTITY | {"MODELSEAL_THREADS", "VAR"},
    "open": IDENTITY | {"MODELSEAL_THREADS", "VAR"},
    "rekey": IDENTITY | {"VAR"} | KEYSERVER_RECIPIENT,
    "serve": IDENTITY | {"MODELSEAL_THREADS", "MODELSEAL_HUGEPAGES", "MODELSEAL_PREFAULT", "VAR"} | REMOTE,
    "keyserver": ADMIN,
    "keyserver init": {"BAO_TOKEN"},
    "keyserver run": {"BAO_TOKEN"},
    "keyserver lease-key": {"MODELSEAL_KEYSERVER_URL", "MODELSEAL_KEYSERVER_CA"},
    **{f"keyserver {group}": ADMIN for group in ("model", "grant", "usage", "master-key", "audit")},
    **{f"keyserver {command}": ADMIN for command in ("model add", "model list", "grant add", "grant list",
                                                    "grant revoke", "usage report", "usage reset",
                                                    "master-key rotate", "audit export", "audit verify")},
    "agent status": {"MODELSEAL_AGENT_SOCKET"},
    "triton-repo": IDENTITY,
    "trace": IDENTITY | ADMIN | {"MODELSEAL_THREADS", "VAR"},  # -i (a sealed suspect), --fingerprint-key env:VAR
    "agent tpm-enroll": {"TPM2TOOLS_TCTI"},
}  # fmt: skip
# Commands that write files (or persistent state) and must say what, in a "Writes:" list; SECRET ones
# write a key or plaintext and must give its mode, 0600.
WRITES = {"keygen", "seal", "open", "rekey", "demo", "keyserver init", "keyserver run", "keyserver migrate",
          "keyserver audit export", "pki init", "pki issue", "pki request", "agent run", "agent tpm-enroll",
          "serve", "triton-repo", "fingerprint keygen"}  # fmt: skip
SECRET = {"keygen", "open", "keyserver init", "pki init", "pki issue", "pki request", "serve", "fingerprint keygen"}
# Long-running services: they report through their logs, not a --json document.
SERVICES = {"keyserver run", "agent run", "serve"}


def section(help_text: str, title: str) -> list[str]:
    """The terms of a help list ("Environment:", "Writes:"): the first word of each two-space-indented row."""
    lines = help_text.splitlines()
    if f"{title}:" not in lines:
        return []
    rows = []
    for line in lines[lines.index(f"{title}:") + 1 :]:
        if not line.strip():
            break
        if re.match(r"  \S", line):
            rows.append(line.split()[0])
    return rows


@pytest.mark.parametrize(("path", "command"), TREE, ids=[" ".join(p) or "modelseal" for p, _ in TREE])
def test_help_names_the_environment_it_reads(path: tuple[str, ...], command: click.Command) -> None:
    listed = section(invoke(*path, "--help").output, "Environment")
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == READS.get(" ".join(path), set()), f"`modelseal {' '.join(path)} --help`"


@pytest.mark.parametrize(("path", "command"), TREE, ids=[" ".join(p) or "modelseal" for p, _ in TREE])
def test_help_says_what_it_writes(path: tuple[str, ...], command: click.Command) -> None:
    name = " ".join(path)
    output = invoke(*path, "--help").output
    writes = output[output.index("\nWrites:\n") :] if "\nWrites:\n" in output else ""
    assert bool(writes) == (name in WRITES), f"`modelseal {name} --help`: Writes: {bool(writes)}"
    if name in SECRET:
        assert "0600" in writes.partition("\n\n")[0], writes
    if not isinstance(command, click.Group) and name not in SERVICES:
        assert "--json" in output, f"`modelseal {name}` has no --json"


def test_the_contract_covers_every_variable() -> None:
    """A variable read anywhere in modelseal is described in the one table, and some command lists it."""
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "modelseal").rglob("*.py") if p.name != "devstack.py")
    read = set(re.findall(r'"(MODELSEAL_[A-Z_]+)"', source))  # devstack's MODELSEAL_TEST_POSTGRES is the tests'
    known = set(ENVIRONMENT) | set(LIBRARY_ENVIRONMENT)  # the latter: Python APIs only, no command reads them
    assert read <= known, sorted(read - known)
    assert not set(LIBRARY_ENVIRONMENT) & set(ENVIRONMENT)
    assert set(ENVIRONMENT) == set().union(*READS.values())


@pytest.mark.parametrize(
    ("listen", "names", "url"),
    [
        ("127.0.0.1:9443", [], "https://127.0.0.1:9443"),  # the default names cover the listen address
        ("127.0.0.1:9443", ["localhost"], "https://localhost:9443"),  # issue 23: printed 127.0.0.1
        ("127.0.0.1:9443", ["keys.example", "127.0.0.1"], "https://127.0.0.1:9443"),
        ("[::1]:9443", ["::1"], "https://[::1]:9443"),
        ("0.0.0.0:9443", ["keys.example"], "https://keys.example:9443"),
    ],
)
def test_init_prints_a_url_its_certificate_covers(tmp_path: Path, listen: str, names: list[str], url: str) -> None:
    """``keyserver init`` tells clients a URL whose name the server certificate holds (the run log too:
    test_keyserver_cli.py); the URL a client is given must pass its TLS check."""
    names_args = [a for n in names for a in ("--server-name", n)]
    human = invoke("keyserver", "init", str(tmp_path / "a"), "--listen", listen, *names_args)
    assert human.exit_code == 0, human.output
    assert f"service URL:       {url} (what --url and keyserver: recipients take)" in human.stdout.splitlines()
    report = invoke("keyserver", "init", str(tmp_path / "b"), "--listen", listen, *names_args, "--json")
    assert json.loads(report.stdout)["url"] == url


def test_the_tree_has_every_documented_command() -> None:
    assert DOCUMENTED <= set(main.commands), f"missing: {sorted(DOCUMENTED - set(main.commands))}"
    assert len(TREE) > 30  # groups are walked, not just the top level


@pytest.mark.parametrize(
    "args",
    [
        ["keygen", "-o", "k", "--signing", "--symmetric"],
        ["seal", "x", "-o", "y", "-r", "x25519:a", "--segment-size", "abc"],
        ["no-such-command"],
        ["inspect"],
        ["keyserver", "grant", "add", "--no-such-option"],
        ["pki", "issue"],
    ],
    ids=" ".join,
)
def test_usage_errors_are_one_line(args: list[str]) -> None:
    """Attack run 2: click's usage errors printed four lines of usage and exited 2."""
    result = invoke(*args)
    assert result.exit_code == 1, (args, result.output)
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("modelseal: error: ")


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("modelseal, version ")


def test_console_script_names_the_cli() -> None:
    """pyproject's ``modelseal`` script resolves to this command group (the install writes the script from it)."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["modelseal"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is main


def test_python_dash_m_starts() -> None:
    """``python -m modelseal`` imports and registers everything, with no output on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "modelseal", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("Usage: python -m modelseal ") and "Commands:" in proc.stdout


def test_console_script_starts() -> None:
    """The installed ``modelseal`` script (README: ``.venv/bin/modelseal demo``) runs this CLI; a script left
    from an install before a module moved fails here, not in a user's first command."""
    script = Path(sys.executable).with_name("modelseal")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (not installed with pip install -e .)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("Usage: modelseal ") and "Commands:" in proc.stdout


def test_init_sets_how_often_leases_renew(tmp_path: Path) -> None:
    """``--renew-after``: how soon a revocation reaches hosts, without editing the config by hand."""
    import tomllib

    assert invoke("keyserver", "init", str(tmp_path / "ks"), "--renew-after", "2").exit_code == 0
    leases = tomllib.loads((tmp_path / "ks" / "keyserver.toml").read_text())["leases"]
    assert leases["renew_after_s"] == 2 and leases["lease_ttl_s"] == 300
    refused = invoke("keyserver", "init", str(tmp_path / "bad"), "--renew-after", "300")
    assert refused.exit_code == 1 and "--renew-after must be 1 to 299 seconds" in refused.output
    assert not (tmp_path / "bad").exists()
