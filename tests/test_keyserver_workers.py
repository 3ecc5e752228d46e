"""``modelseal keyserver run --workers N``: several processes on one port over one PostgreSQL database,
one audit chain; challenges from one worker are spent at another; SIGTERM stops them all; a worker that
dies stops the service with an error (a supervisor restarts it)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modelseal.encoding import b64d, b64e
from modelseal.keyserver import auditchain as audit
from modelseal.pki import identity_of_cert_file
from modelseal.release import protocol

from .services import KeyServer, PostgresSchema, wait_for

pytestmark = pytest.mark.slow  # real processes


def worker_pids(server: KeyServer) -> list[int]:
    return [int(p) for p in re.findall(r"key service on \S+ \(.*worker pid (\d+)\)", server.log.read_text())]


def test_workers_share_one_port_one_database_and_one_audit_chain(tmp_path: Path) -> None:
    schema = PostgresSchema()
    server = KeyServer(tmp_path / "ks", schema.url, workers=3).start()
    try:
        wait_for(lambda: len(worker_pids(server)) == 3, 20, "three workers to listen")
        cert = server.host_cert("host-a")
        identity = identity_of_cert_file(cert[0])
        with server.admin() as admin:
            admin.call("POST", "/v1/admin/models", {"model": "m"})
            key_id = admin.call("POST", "/v1/admin/keys", {"model": "m", "key": b64e(bytes(range(32)))})["key_id"]
            admin.call("POST", "/v1/admin/grants", {"model": "m", "identity": identity.spki})
        service_key = protocol.load_service_public_key(server.info["lease_public_key"])

        def release(_: int) -> bytes:
            # a new connection per step: the kernel spreads them over the workers, so a nonce one worker
            # issued is often spent at another
            with server.host_client(cert) as c1:
                nonce = c1.post("/v1/challenge", json={"key_id": key_id}).json()["nonce"]
            eph = protocol.EphemeralKey()
            body = {"key_id": key_id, "nonce": nonce, "ephemeral_key": b64e(eph.public), "evidence": []}
            with server.host_client(cert) as c2:
                answer = c2.post("/v1/release", json=body)
                assert answer.status_code == 200, answer.text
                replay = c2.post("/v1/release", json=body)
                assert replay.status_code == 409 and replay.json()["error"]["code"] == "nonce_reused"
            _, dek = eph.open_release(
                answer.json(), nonce=b64d(nonce), client_spki_hash=identity.spki_hash, key_id=key_id,
                service_key=service_key,
            )  # fmt: skip
            return bytes(dek)

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(release, range(48))) == {bytes(range(32))}
        with server.admin() as admin:
            entries = admin.call("GET", "/v1/admin/audit")["entries"]
        assert audit.verify_entries(entries).ok  # one chain, however many processes appended to it
        events = [json.loads(e["entry"]) for e in entries]
        assert sum(1 for e in events if e["event"] == "release" and e["decision"] == "ok") == 48
        assert sum(1 for e in events if e.get("code") == "nonce_reused") >= 5  # the rest may be a summary

        pids = worker_pids(server)
        server.stop(signal.SIGTERM)
        for pid in pids:
            wait_for(lambda pid=pid: not _alive(pid), 15, f"worker {pid} to stop")
    finally:
        server.stop()
        schema.drop()


def test_a_worker_that_dies_stops_the_service_with_an_error(tmp_path: Path) -> None:
    schema = PostgresSchema()
    server = KeyServer(tmp_path / "ks", schema.url, workers=2).start()
    try:
        wait_for(lambda: len(worker_pids(server)) == 2, 20, "two workers to listen")
        first, second = worker_pids(server)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not _alive(second), 15, "the other worker to be stopped")
        assert server.proc is not None
        deadline = time.monotonic() + 15
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.proc.returncode not in (None, 0)
        assert "exited with -9: stopping the others" in server.log.read_text()
    finally:
        server.stop()
        schema.drop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_ready_follows_the_database_while_health_stays_up(tmp_path: Path) -> None:
    """``/v1/ready`` (the Kubernetes readiness probe) reads the database; ``/v1/health`` (liveness) does not."""
    schema = PostgresSchema()
    server = KeyServer(tmp_path / "ks", schema.url).start()
    try:
        with server.host_client(None) as anon:
            assert anon.get("/v1/ready").json() == {"status": "ready"}
            schema.drop()  # the database goes away under the running service
            lost = anon.get("/v1/ready")
            assert lost.status_code == 503 and lost.json()["error"]["code"] == "not_ready"
            assert anon.get("/v1/health").status_code == 200
    finally:
        server.stop()


def test_killing_the_supervisor_takes_its_workers_and_sqlite_gets_one(tmp_path: Path) -> None:
    schema = PostgresSchema()
    server = KeyServer(tmp_path / "ks", schema.url, workers=3).start()
    try:
        wait_for(lambda: len(worker_pids(server)) == 3, 20, "three workers to listen")
        server.stop(signal.SIGKILL)  # no chance to forward anything: the kernel's parent-death signal does
        for pid in worker_pids(server):
            wait_for(lambda pid=pid: not _alive(pid), 15, f"orphaned worker {pid} to stop")
    finally:
        server.stop()
        schema.drop()
    with pytest.raises(Exception, match="--workers needs PostgreSQL"):
        KeyServer(tmp_path / "sqlite", None, workers=2).start()


@pytest.mark.parametrize(
    ("setting", "value"), [("challenge_ttl_s", 2**32), ("challenge_ttl_s", -100), ("renew_after_s", 0)]
)
def test_lease_settings_out_of_range_stop_the_service_at_start(tmp_path: Path, setting: str, value: int) -> None:
    from modelseal.errors import UsageError
    from modelseal.keyserver.config import KeyServerConfig, init_state

    config = Path(init_state(tmp_path / "ks")["config"])
    config.write_text(re.sub(rf"^{setting} = \d+$", f"{setting} = {value}", config.read_text(), flags=re.M))
    with pytest.raises(UsageError, match=f"\\[leases\\] {setting} must be from 1 to"):
        KeyServerConfig.load(config)
