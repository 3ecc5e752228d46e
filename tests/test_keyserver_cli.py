"""The key-service and agent commands as an operator runs them: subprocesses, JSON, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelseal.pki import identity_of_cert_file

from .services import Agent, KeyServer
from .test_cli import ms
from .test_keyserver import sealed_model

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier


def test_admin_commands_end_to_end(tmp_path: Path) -> None:
    server = KeyServer(tmp_path / "ks", None).start()
    env = server.admin_env()
    try:
        assert "registered model m1" in ms("keyserver", "model", "add", "m1", "--description", "first", env=env).stdout
        models = json.loads(ms("keyserver", "model", "list", "--json", env=env).stdout)
        assert [(m["name"], m["keys"]) for m in models] == [("m1", 0)]

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
        ms("keyserver", "audit", "export", "-o", export, env=env)
        last = json.loads(export.read_text().splitlines()[-1])
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
