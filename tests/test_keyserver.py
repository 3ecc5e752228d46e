"""The key service and the agent end to end, on loopback with real TLS, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import modelseal
import modelseal.numpy
from modelseal.encoding import b64d, b64e
from modelseal.errors import KeyReleaseError
from modelseal.load.artifacts import key_ids
from modelseal.pki import identity_of_cert_file
from modelseal.release import protocol
from modelseal.release.recipient import KeyserverRecipient
from modelseal.release.wire import ask

from .conftest import make_tensors
from .services import Agent, KeyServer, PostgresSchema, wait_for

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None  # the default: a SQLite file in the state directory
        return
    schema = PostgresSchema()
    try:
        yield schema.url
    finally:
        schema.drop()


@pytest.fixture
def server(tmp_path: Path, database: str | None) -> Iterator[KeyServer]:
    ks = KeyServer(tmp_path / "ks", database, leases={"lease_ttl_s": 4, "renew_after_s": 1}).start()
    try:
        yield ks
    finally:
        ks.stop()


def sealed_model(server: KeyServer, tmp_path: Path, model: str = "demo") -> Path:
    from safetensors.numpy import save_file

    with server.admin() as admin:
        admin.call("POST", "/v1/admin/models", {"model": model})
    plain = tmp_path / f"{model}.safetensors"
    save_file(make_tensors(), str(plain))
    out = tmp_path / f"{model}.sealed.safetensors"
    modelseal.seal(plain, out, [KeyserverRecipient(server.url, model, token=server.token, ca=server.ca)])
    return out


def key_of(sealed: Path) -> str:
    """The key-service key id a sealed file is wrapped to (read from its header, no key needed)."""
    [key_id] = key_ids(sealed)
    return key_id


def grant(server: KeyServer, model: str, identity: str, **extra: object) -> dict:  # type: ignore[type-arg]
    with server.admin() as admin:
        return admin.call("POST", "/v1/admin/grants", {"model": model, "identity": identity, **extra})


def test_grant_load_refuse_revoke_regrant(server: KeyServer, tmp_path: Path) -> None:
    sealed = sealed_model(server, tmp_path)
    assert key_of(sealed).startswith("k_") and server.token.encode() not in sealed.read_bytes()  # only the key id
    cert_a, cert_b = server.host_cert("host-a"), server.host_cert("host-b")
    g = grant(server, "demo", identity_of_cert_file(cert_a[0]).spki)
    agent_a, agent_b = Agent(server, cert_a, tmp_path).start(), Agent(server, cert_b, tmp_path).start()
    try:
        loaded = modelseal.numpy.load_file(sealed, identity=f"agent:{agent_a.socket}")
        for name, value in make_tensors().items():
            np.testing.assert_array_equal(loaded[name], value)

        with pytest.raises(KeyReleaseError) as refused:
            modelseal.numpy.load_file(sealed, identity=f"agent:{agent_b.socket}")
        assert refused.value.code == "not_granted"

        with server.admin() as admin:
            admin.call("POST", f"/v1/admin/grants/{g['grant_id']}/revoke", {"reason": "contract ended"})
        # renew_after_s = 1: the agent drops the key at its next renewal
        wait_for(lambda: ask(agent_a.socket, {"op": "status"})[0]["keys"] == [], 15, "agent A to drop the key")
        status = ask(agent_a.socket, {"op": "status"})[0]
        assert [d["code"] for d in status["dropped"].values()] == ["revoked"]
        with pytest.raises(KeyReleaseError, match="revoked: contract ended") as after:
            modelseal.numpy.load_file(sealed, identity=f"agent:{agent_a.socket}")
        assert after.value.code == "revoked"

        grant(server, "demo", identity_of_cert_file(cert_a[0]).spki)  # re-grant: no agent restart needed
        assert modelseal.numpy.load_file(sealed, identity=f"agent:{agent_a.socket}")["counts"].shape == (7, 3)
    finally:
        agent_a.stop()
        agent_b.stop()
    with server.admin() as admin:
        entries = admin.call("GET", "/v1/admin/audit")["entries"]
    decisions = [(json.loads(e["entry"])["event"], json.loads(e["entry"]).get("code")) for e in entries]
    assert ("release", "not_granted") in decisions and ("release", "revoked") in decisions
    assert ("grant.revoke", None) in decisions


def _release_body(client: httpx.Client, key_id: str) -> tuple[dict, protocol.EphemeralKey]:  # type: ignore[type-arg]
    challenge = client.post("/v1/challenge", json={"key_id": key_id})
    assert challenge.status_code == 200, challenge.text
    eph = protocol.EphemeralKey()
    body = {"key_id": key_id, "nonce": challenge.json()["nonce"], "ephemeral_key": b64e(eph.public), "evidence": []}
    return body, eph


def _code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_attacks_and_bad_requests_are_refused_and_audited(server: KeyServer, tmp_path: Path) -> None:
    sealed = sealed_model(server, tmp_path)
    key_id = key_of(sealed)
    cert_a, cert_b = server.host_cert("host-a"), server.host_cert("host-b")
    spki_a = identity_of_cert_file(cert_a[0])
    grant(server, "demo", spki_a.spki)
    with server.host_client(cert_a) as a, server.host_client(cert_b) as b, server.host_client(None) as anon:
        body, eph = _release_body(a, key_id)
        ok = a.post("/v1/release", json=body)
        assert ok.status_code == 200
        lease, dek = eph.open_release(
            ok.json(), nonce=b64d(body["nonce"]), client_spki_hash=spki_a.spki_hash,
            key_id=key_id, service_key=protocol.load_service_public_key(server.info["lease_public_key"]),
        )  # fmt: skip
        assert len(dek) == 32 and lease.model == "demo"
        secret = (b64e(bytes(dek)), bytes(dek).hex())

        assert _code(a.post("/v1/release", json=body)) == (409, "nonce_reused")  # replay of the captured exchange
        replay = {**body, "ephemeral_key": b64e(protocol.EphemeralKey().public)}
        assert _code(a.post("/v1/release", json=replay)) == (409, "nonce_reused")  # reused nonce, new key

        stolen, _ = _release_body(a, key_id)
        assert _code(b.post("/v1/release", json=stolen)) == (403, "nonce_mismatch")  # A's nonce used by B
        fresh_b, _ = _release_body(b, key_id)
        assert _code(b.post("/v1/release", json=fresh_b)) == (403, "not_granted")  # wrong client certificate
        assert _code(anon.post("/v1/challenge", json={"key_id": key_id})) == (401, "no_client_cert")
        unknown = {**body, "nonce": b64e(bytes(32))}
        assert _code(a.post("/v1/release", json=unknown)) == (403, "nonce_unknown")
        assert _code(a.post("/v1/challenge", json={"key_id": "k_nope"})) == (404, "unknown_key")

        bad_json = a.post("/v1/release", content=b'{"key_id": ', headers={"content-type": "application/json"})
        assert _code(bad_json) == (400, "malformed_json")
        assert _code(a.post("/v1/release", json=[1, 2])) == (400, "malformed_json")
        assert _code(a.post("/v1/release", json={**body, "ephemeral_key": "!!"})) == (400, "bad_request")
        assert _code(a.post("/v1/release", json={**body, "evidence": "tpm"})) == (400, "bad_request")
        big = a.post("/v1/release", content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
        assert _code(big) == (413, "too_large")

    # a client certificate from a foreign CA never gets past the TLS handshake
    from modelseal import pki

    pki.init_ca(tmp_path / "rogue")
    rogue = pki.issue(tmp_path / "rogue", "host-a")
    with server.host_client((str(rogue[0]), str(rogue[1]))) as r, pytest.raises(httpx.HTTPError):
        r.post("/v1/challenge", json={"key_id": key_id}).raise_for_status()
    assert server.healthy()

    with server.admin() as admin:
        codes = [json.loads(e["entry"]).get("code") for e in admin.call("GET", "/v1/admin/audit")["entries"]]
    expected = "nonce_reused nonce_mismatch not_granted no_client_cert nonce_unknown unknown_key malformed_json"
    for code in (*expected.split(), "bad_request", "too_large"):
        assert code in codes, code
    assert codes.count("nonce_reused") == 2
    server.stop()
    db_file = server.dir / "keyserver.db"
    on_disk = server.log.read_text() + (db_file.read_bytes().decode("latin-1") if db_file.exists() else "")
    assert not any(s in on_disk for s in secret)  # the data key is in no log and not in the clear in the database


def test_sigkill_loses_no_committed_grant(tmp_path: Path, database: str | None) -> None:
    ks = KeyServer(tmp_path / "ks", database).start()
    with ks.admin() as admin:
        admin.call("POST", "/v1/admin/models", {"model": "m"})
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with ks.admin() as admin:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    g = admin.call("POST", "/v1/admin/grants", {"model": "m", "identity": f"spiffe://t/host/{n}"})
                except modelseal.ModelsealError:
                    return
                acknowledged.append(g["grant_id"])

    thread = threading.Thread(target=writer)
    thread.start()
    wait_for(lambda: len(acknowledged) >= 30, 30, "30 grants")
    ks.stop(signal.SIGKILL)
    stop.set()
    thread.join(30)
    ks.start()
    try:
        with ks.admin() as admin:
            stored = {g["grant_id"] for g in admin.call("GET", "/v1/admin/grants")["grants"]}
            assert set(acknowledged) <= stored
            entries = admin.call("GET", "/v1/admin/audit", limit=10000)["entries"]
        from modelseal.keyserver.auditchain import verify_entries

        assert verify_entries(entries).ok
    finally:
        ks.stop()
