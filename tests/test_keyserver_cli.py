"""The key-service and agent commands as an operator runs them: subprocesses, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelseal.pki import identity_of_cert_file

from .services import Agent, KeyServer, free_port, wait_for
from .test_cli import ms
from .test_keyserver import sealed_model

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier


def test_admin_commands_end_to_end(tmp_path: Path) -> None:
    server = KeyServer(tmp_path / "ks", None).start()
    env = server.admin_env()
    try:
        assert "registered model m1" in ms("keyserver", "model", "add", "m1", "--description", "first", env=env).stdout
        assert "registered model m0" in ms("keyserver", "model", "add", "m0", env=env).stdout  # no description
        models = json.loads(ms("keyserver", "model", "list", "--json", env=env).stdout)
        assert [(m["name"], m["keys"]) for m in models] == [("m0", 0), ("m1", 0)]

        issued = json.loads(
            ms("pki", "issue", tmp_path / "ks" / "pki", "host-a", "--uri", "spiffe://t/a", "--json").stdout
        )
        assert issued["identity"] == identity_of_cert_file(issued["cert"]).spki and issued["uris"] == ["spiffe://t/a"]
        granted = json.loads(
            ms("keyserver", "grant", "add", "m1", "--cert", issued["cert"], "--days", "30", "--max-releases", "5",
               "--policy", "licence.releases < 5", "--evidence", "mtls", "--json", env=env).stdout
        )  # fmt: skip
        assert granted["max_releases"] == 5 and granted["evidence"] == [{"kind": "mtls"}]
        bad = ms("keyserver", "grant", "add", "m1", "spki:x", "--policy", "licence.releases <", env=env, check=False)
        assert bad.returncode == 1 and "policy does not compile" in bad.stderr

        sealed = sealed_model(server, tmp_path, "m2")
        grant_b = json.loads(
            ms("keyserver", "grant", "add", "m2", "spiffe://t/*", "--max-hosts", "1", "--json", env=env).stdout
        )
        agent = Agent(server, (issued["cert"], issued["key"]), tmp_path).start()
        try:
            assert ms("verify", sealed, "-i", f"agent:{agent.socket}").returncode == 0
            status = json.loads(ms("agent", "status", "--socket", agent.socket, "--json").stdout)
            assert [k["model"] for k in status["keys"]] == ["m2"] and "key" not in json.dumps(
                status["keys"][0]
            ).replace("key_id", "")
        finally:
            agent.stop()
        assert "revoked" in ms("keyserver", "grant", "revoke", grant_b["grant_id"], env=env).stdout
        grants = json.loads(ms("keyserver", "grant", "list", "--model", "m2", "--json", env=env).stdout)
        assert grants[0]["revoked_at"] is not None and grants[0]["hosts"] == 1

        rotated = json.loads(ms("keyserver", "master-key", "rotate", "--json", env=env).stdout)
        assert rotated == {"version": "local:2", "rewrapped": 1}

        export = tmp_path / "audit.jsonl"
        done = ms("keyserver", "audit", "export", "-o", export, env=env)
        last = json.loads(export.read_text().splitlines()[-1])
        head = f"{last['seq']}:{last['hash']}"
        assert done.stdout == (
            f"exported {last['seq']} entries to {export}; head {head} (keep it for `audit verify --head`)\n"
        )
        check_audit_export_outputs(tmp_path, env, last["seq"])
        ok = json.loads(ms("keyserver", "audit", "verify", "--file", export, "--head", f"{last['seq']}:{last['hash']}",
                           "--json").stdout)  # fmt: skip
        assert ok["ok"] and ok["count"] == last["seq"]
        cut = export.read_text().splitlines()[:-1]
        export.write_text("\n".join(cut) + "\n")
        broken = ms(
            "keyserver", "audit", "verify", "--file", export, "--head", f"{last['seq']}:{last['hash']}", check=False
        )
        assert broken.returncode == 1 and f"entry {last['seq']} existed" in broken.stdout

        no_token = {k: v for k, v in env.items() if "TOKEN" not in k}
        denied = ms("keyserver", "model", "list", env={**no_token, "MODELSEAL_ADMIN_TOKEN": "wrong"}, check=False)
        assert denied.returncode == 1 and "401 unauthorised" in denied.stderr
    finally:
        server.stop()


def check_audit_export_outputs(tmp_path: Path, env: dict[str, str], seq: int) -> None:
    """``audit export``: --json names the head it wrote; to stdout, the entries stay pure JSON Lines and the
    summary goes to stderr; --json with stdout is a one-line usage error (issue 23: it printed nothing)."""
    again = tmp_path / "again.jsonl"
    report = json.loads(
        ms("keyserver", "audit", "export", "-o", again, "--after", str(seq - 2), "--json", env=env).stdout
    )
    rows = [json.loads(line) for line in again.read_text().splitlines()]
    assert rows[0]["seq"] == seq - 1 and report == {
        "file": str(again), "entries": len(rows), "after": seq - 2, "head": f"{rows[-1]['seq']}:{rows[-1]['hash']}"
    }  # fmt: skip
    piped = ms("keyserver", "audit", "export", "--after", str(seq - 2), env=env)
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert piped.stderr == f"exported {len(rows)} entries to stdout; head {rows[-1]['seq']}:{rows[-1]['hash']} " \
        "(keep it for `audit verify --head`)\n"  # fmt: skip
    none = ms("keyserver", "audit", "export", "--after", "999999", env=env)
    assert none.stdout == "" and none.stderr == "exported 0 entries to stdout (none after 999999)\n"
    refused = ms("keyserver", "audit", "export", "--json", env=env, check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == "modelseal: error: --json needs -o FILE (stdout carries the entries)\n"


def test_run_logs_a_url_its_certificate_covers(tmp_path: Path) -> None:
    """Issue 23: with ``init --server-name localhost`` the start-up line said https://127.0.0.1:PORT, a URL
    whose name the certificate does not hold; it names localhost now, as ``init`` printed."""
    port = free_port()
    init = json.loads(ms("keyserver", "init", tmp_path / "ks", "--listen", f"127.0.0.1:{port}",
                         "--server-name", "localhost", "--json").stdout)  # fmt: skip
    assert init["url"] == f"https://localhost:{port}"
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelseal.cli.main", "keyserver", "run", "--config", init["config"]],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(lambda: "key service on" in log.read_text() or proc.poll() is not None, what="the start-up line")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    line = next(line for line in log.read_text().splitlines() if "key service on" in line)
    assert f"key service on https://localhost:{port} (" in line, line


def test_init_with_an_unreachable_database_writes_nothing(tmp_path: Path) -> None:
    """It wrote the master key, the admin token and the CA key, then failed on the database and left them:
    a second init then refused the half-made directory."""
    bad = "postgresql://nobody@127.0.0.1:1/nothing"
    for _ in range(2):  # the second attempt fails the same way, not on what the first left
        result = ms("keyserver", "init", tmp_path / "ks", "--db", bad, check=False)
        assert result.returncode != 0 and "cannot migrate the key-service database" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "ks").exists()
