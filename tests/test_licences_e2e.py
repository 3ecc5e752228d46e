"""Licences over real processes: a key service, a host agent keeping its usage log on disk, a server's
:class:`~modelseal.release.meter.Meter` on the agent's socket, and the owner's CLI.

Counts reach the agent's signed log, travel with lease renewals to the key service and come out of
``modelseal keyserver usage report`` (JSON and CSV); a quota is enforced before the request past it; an
agent restart neither loses nor doubles a count; a rolled-back log gets the host's key dropped at its
next renewal. The decisions themselves, and every attack on a report, are in ``test_licences.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelseal.devstack import Agent, KeyServer
from modelseal.encoding import b64e
from modelseal.errors import KeyReleaseError
from modelseal.pki import client_context, identity_of_cert_file
from modelseal.release.meter import LimitExceeded, Meter
from modelseal.release.terms import Usage
from modelseal.release.usage import ChainVerifier
from modelseal.release.wire import ask

pytestmark = pytest.mark.slow


def cli(server: KeyServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **server.admin_env()}
    command = [sys.executable, "-m", "modelseal", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def until(what: str, check: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.server = KeyServer(directory / "ks", None, leases={"renew_after_s": 1}).start()
        self.cert = self.server.host_cert("host-a")
        self.spki = identity_of_cert_file(self.cert[0]).spki
        with self.server.admin() as admin:
            admin.add_model("demo")
            self.key_id = admin.register_key("demo", os.urandom(32))
        self.log = directory / "usage.log"
        self.agent = self.new_agent()

    def new_agent(self) -> Agent:
        return Agent(self.server, self.cert, self.dir, name="agent", usage_log=str(self.log), retry_s=0.5).start()

    def usage(self, *args: str) -> list[dict[str, Any]]:
        done = cli(self.server, "keyserver", "usage", "report", "--json", *args)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout)["usage"])

    def close(self) -> None:
        self.agent.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("licences"))
    try:
        yield s
    finally:
        s.close()


def test_a_quota_is_enforced_and_the_counts_reach_the_owner_exactly_once(stack: Stack) -> None:
    granted = cli(stack.server, "keyserver", "grant", "add", "demo", "--cert", stack.cert[0], "--max-requests", "5",
                  "--licence", "acme-7", "--json")  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    grant = json.loads(granted.stdout)
    assert grant["terms"] == {"metered": True, "max_requests": 5, "licence": "acme-7"}
    key = ask(stack.agent.socket, {"op": "key", "key_id": stack.key_id, "model": "demo"})  # fetch: a release
    assert key[0]["ok"]
    meter = Meter(stack.agent.socket)
    meter.sync()
    licence = meter.licences[stack.key_id]
    assert (licence.grant_id, licence.terms.max_requests, licence.used) == (grant["grant_id"], 5, Usage())
    for _ in range(5):
        meter.admit(stack.key_id, "client-1", Usage(requests=1, items=2))
        meter.record(stack.key_id, Usage(requests=1, items=2))
    with pytest.raises(LimitExceeded, match="max_requests 5 per day reached") as refused:
        meter.admit(stack.key_id, "client-2", Usage(requests=1, items=1))
    assert refused.value.kind == "quota" and refused.value.retry_after > 0
    meter.sync()
    rows = until("the usage to reach the key service", lambda: [r for r in stack.usage() if r["requests"] == 5])
    assert (rows[0]["licence"], rows[0]["items"], rows[0]["grant_id"]) == ("acme-7", 10, grant["grant_id"])
    table = cli(stack.server, "keyserver", "usage", "report", "--csv", "--grant", grant["grant_id"])
    [row] = list(csv.DictReader(io.StringIO(table.stdout)))
    assert (row["licence"], row["requests"], row["items"], row["tokens"]) == ("acme-7", "5", "10", "0")

    # the same report sent again (its answer lost), then the agent restarts: nothing counted twice
    counts = [{"key_id": stack.key_id, "requests": 5, "items": 10}]
    answer, _ = ask(stack.agent.socket, {"op": "usage", "source": meter.source, "seq": 1, "counts": counts})
    assert answer["licences"][0]["used"]["requests"] == 5
    entries = stack.log.read_bytes().splitlines()
    stack.agent.stop()
    stack.agent = stack.new_agent()
    ask(stack.agent.socket, {"op": "key", "key_id": stack.key_id, "model": "demo"})
    again, _ = ask(stack.agent.socket, {"op": "usage", "source": meter.source, "seq": 1, "counts": counts})
    assert stack.log.read_bytes().splitlines() == entries and again["licences"][0]["used"]["requests"] == 5
    verifier = ChainVerifier()
    verifier.add_all(entries)
    assert verifier.head.totals[grant["grant_id"]] == Usage(requests=5, items=10)
    time.sleep(2.5)  # renewals after the restart
    assert [r["requests"] for r in stack.usage("--grant", grant["grant_id"])] == [5]


def test_a_rolled_back_log_loses_the_host_its_key(stack: Stack) -> None:
    with stack.server.admin() as admin:
        admin.add_model("other")
        key_id = admin.register_key("other", os.urandom(32))
        admin.add_grant({"model": "other", "identity": stack.spki, "evidence": [], "terms": {"metered": True}})
    ask(stack.agent.socket, {"op": "key", "key_id": key_id, "model": "other"})
    saved = stack.log.read_bytes()
    meter = Meter(stack.agent.socket)
    meter.sync()
    meter.record(key_id, Usage(requests=100))
    meter.sync()
    until("the report", lambda: [r for r in stack.usage("--model", "other") if r["requests"] == 100])
    stack.agent.stop()
    stack.log.write_bytes(saved)  # undo the 100 requests
    stack.agent = stack.new_agent()

    def dropped() -> Any:
        status, _ = ask(stack.agent.socket, {"op": "status"})
        return status["dropped"].get(key_id)

    why = until("the renewal to be refused", dropped)
    assert why["code"] == "usage_rejected" and "rolls back the log" in why["message"]
    reset = cli(stack.server, "keyserver", "usage", "reset", stack.spki, "--reason", "restored backup", "--json")
    assert reset.returncode == 0 and json.loads(reset.stdout) == {"host": stack.spki, "log": None, "reset": 1}
    answer, _ = ask(stack.agent.socket, {"op": "key", "key_id": key_id, "model": "other"})
    assert answer["ok"]
    assert [r["requests"] for r in stack.usage("--model", "other")] == [100]  # counted once, not lost


def test_the_usage_operation_refuses_what_it_must(stack: Stack) -> None:
    socket = stack.agent.socket
    bad = [
        {"op": "usage"},
        {"op": "usage", "source": "s", "seq": -1},
        {"op": "usage", "source": "a b", "seq": 1},
        {"op": "usage", "source": "s", "seq": 1, "counts": [{"key_id": stack.key_id, "requests": -5}]},
        {"op": "usage", "source": "s", "seq": 1, "counts": [{"key_id": stack.key_id, "bananas": 1}]},
        {"op": "usage", "source": "s", "seq": 1, "counts": [{"key_id": "k_x"}, {"key_id": "k_x"}]},
        {"op": "usage", "source": "s", "seq": 1, "counts": "all"},
        {"op": "usage", "source": "s", "seq": 1, "counts": [{"key_id": stack.key_id, "requests": 2**41}]},
    ]
    for request in bad:
        with pytest.raises(KeyReleaseError) as refused:
            ask(socket, request)
        assert refused.value.code == "bad_request", request


def test_a_key_the_agent_does_not_know_leaves_the_other_counts_logged(stack: Stack) -> None:
    """One unknown key in a report used to refuse the whole report, for ever: the server resent it."""
    ask(stack.agent.socket, {"op": "key", "key_id": stack.key_id, "model": "demo"})
    before = len(stack.log.read_bytes().splitlines())
    meter = Meter(stack.agent.socket)
    unknown = b64e(b"never-released-here")
    meter.record(stack.key_id, Usage(requests=1, items=1))
    meter.record(unknown, Usage(requests=3))
    meter.sync()
    assert meter.refused == {unknown: "unknown_key"}
    assert len(stack.log.read_bytes().splitlines()) == before + 1  # the known key's count is logged
    meter.sync()  # the unknown key's counts are kept for when the agent knows it; nothing else is resent
    assert len(stack.log.read_bytes().splitlines()) == before + 1


def test_trace_takes_its_candidates_from_the_key_services_grants(stack: Stack) -> None:
    """The licence a fingerprinted copy was sealed for is recorded in the key service (the grant's
    --licence), so the owner traces a leak against every licence it ever granted, revoked ones included."""
    d = stack.dir / "trace"
    d.mkdir()
    rng = np.random.default_rng(7)
    save_file({"layer.weight": rng.standard_normal((128, 128), dtype=np.float32)}, str(d / "orig.safetensors"))
    for licence in ("lic-a", "lic-b", "lic-c"):
        holder = identity_of_cert_file(stack.server.host_cert(f"customer-{licence}")[0]).spki
        added = cli(stack.server, "keyserver", "grant", "add", "demo", holder, "--licence", licence, "--json")
        assert added.returncode == 0, added.stderr
    revoked = json.loads(added.stdout)["grant_id"]
    assert cli(stack.server, "keyserver", "grant", "revoke", revoked).returncode == 0
    assert cli(stack.server, "keygen", "-o", str(d / "host.key")).returncode == 0
    assert cli(stack.server, "fingerprint", "keygen", "-o", str(d / "fp.key")).returncode == 0
    sealed = cli(stack.server, "seal", str(d / "orig.safetensors"), "-o", str(d / "leak.sealed"), "-r",
                 str(d / "host.pub"), "--fingerprint", "lic-c", "--fingerprint-key", str(d / "fp.key"))  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr
    found = cli(stack.server, "trace", str(d / "leak.sealed"), "-i", str(d / "host.key"), "--original",
                str(d / "orig.safetensors"), "--fingerprint-key", str(d / "fp.key"), "--candidates",
                "keyserver:demo", "--json")  # fmt: skip
    assert found.returncode == 0, found.stderr
    report = json.loads(found.stdout)
    assert (report["verdict"], report["licence"]) == ("identified", "lic-c") and report["candidates"] >= 3
    none = cli(stack.server, "trace", str(d / "leak.sealed"), "-i", str(d / "host.key"), "--original",
               str(d / "orig.safetensors"), "--fingerprint-key", str(d / "fp.key"), "--candidates",
               "keyserver:other")  # fmt: skip
    assert none.returncode == 1 and "carry no licence id" in none.stderr


def test_counts_kept_through_a_failed_report_all_arrive_at_the_next(stack: Stack) -> None:
    """A report that found no agent is resent first, then what was counted since: the review saw a clean
    stop send only the resend and leave the rest behind."""
    with stack.server.admin() as admin:
        admin.add_model("kept")
        key_id = admin.register_key("kept", os.urandom(32))
        admin.add_grant({"model": "kept", "identity": stack.spki, "evidence": [], "terms": {"metered": True}})
    ask(stack.agent.socket, {"op": "key", "key_id": key_id, "model": "kept"})
    meter = Meter(stack.agent.socket)
    meter.sync()
    stack.agent.stop()
    meter.record(key_id, Usage(requests=3, items=3))
    with pytest.raises(KeyReleaseError):
        meter.sync()  # the report of 3 is in flight, unanswered
    meter.record(key_id, Usage(requests=2, items=2))
    stack.agent = stack.new_agent()
    ask(stack.agent.socket, {"op": "key", "key_id": key_id, "model": "kept"})
    meter.sync()  # one call: the resend, then the 2
    verifier = ChainVerifier()
    verifier.add_all(stack.log.read_bytes().splitlines())
    grant = meter.licences[key_id].grant_id
    assert verifier.head.totals[grant] == Usage(requests=5, items=5)


def test_the_admin_usage_query_refuses_malformed_parameters(stack: Stack) -> None:
    """A NUL in a grant id reached PostgreSQL in the first review (a 500); every parameter is checked."""
    import httpx

    headers = {"Authorization": f"Bearer {stack.server.token}"}
    with httpx.Client(base_url=stack.server.url, verify=client_context(stack.server.ca), headers=headers) as admin:
        for query in ("grant=g_%00x", "model=../etc", "since=x", "until=-1", "since=10&until=5", "period=fortnight",
                      "period=3", "since=" + "9" * 40):  # fmt: skip
            answer = admin.get(f"/v1/admin/usage?{query}")
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request", query
        assert admin.get("/v1/admin/usage", headers={"Authorization": "Bearer wrong"}).status_code == 401
