"""The key service's decisions, called directly on :class:`KeyService` (no HTTP, no process), on each store.

Every test runs on the in-process :class:`MemoryStore` and on the SQL store over an in-memory SQLite
database migrated by the real migrations (and, in the full suite, over PostgreSQL), so every store is
held to the same decisions. The
clock is the service's own (``clock=``), so expiry is decided at chosen times, not by sleeping. What
only a real process can show (TLS client certificates, request parsing, crashes, PostgreSQL replicas)
stays in ``test_keyserver.py`` and ``test_hardening_keyserver.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from modelseal.attest import verifiers_from_config
from modelseal.attest.mtls import MtlsVerifier
from modelseal.encoding import b64d, b64e
from modelseal.keyserver.auditchain import verify_entries
from modelseal.keyserver.masterkey import LocalMasterKey
from modelseal.keyserver.memstore import MemoryStore, StoreIntegrityError
from modelseal.keyserver.refusals import RefusalSettings
from modelseal.keyserver.service import KeyService, Refused, ServiceSettings
from modelseal.keyserver.sqlstore.store import open_store
from modelseal.keyserver.store import ModelRecord, Store
from modelseal.pki import PeerIdentity
from modelseal.release.protocol import EphemeralKey, Lease

from .services import PostgresSchema

ADMIN = {"remote": "127.0.0.1", "path": "/v1/admin", "actor": "admin"}
HOST = {"remote": "127.0.0.1", "path": "/v1/release"}
T0 = 1_800_000_000
SETTINGS = ServiceSettings(lease_ttl_s=300, renew_after_s=60, challenge_ttl_s=60, default_grace_s=600)


class Clock:
    """The service's clock, moved by the test."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


def host(name: str, *uris: str) -> PeerIdentity:
    digest = hashlib.sha256(name.encode()).digest()
    return PeerIdentity("spki:" + b64e(digest), digest, uris, subject=f"CN={name}")


STORES = ["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.slow)]


@contextmanager
def new_store(kind: str, directory: Path) -> Iterator[Store]:
    """A fresh, empty store: in memory, SQLite (in memory, or a file in ``directory`` for threads), PostgreSQL."""
    schema = PostgresSchema() if kind == "postgresql" else None
    if kind == "memory":
        store: Store = MemoryStore()
    elif schema is not None:
        store = open_store(schema.url)
    else:
        store = open_store("sqlite://" if kind == "sqlite" else f"sqlite:///{directory / 'ks.db'}")
    try:
        yield store
    finally:
        store.close()
        if schema is not None:
            schema.drop()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with new_store(request.param, tmp_path) as s:
        yield s


@dataclass
class Rig:
    """A key service with one model ``demo`` and one registered data key."""

    service: KeyService
    clock: Clock
    dek: bytes
    key_id: str

    def grant(self, identity: str, **spec: Any) -> dict[str, Any]:
        return self.service.add_grant("demo", {"identity": identity, "evidence": [], **spec}, ADMIN)

    def release(
        self, peer: PeerIdentity, key_id: str | None = None, evidence: list[dict[str, Any]] | None = None
    ) -> tuple[Lease, bytes]:
        """One challenge and release, the answer opened as the agent opens it."""
        key_id = key_id or self.key_id
        nonce = self.service.challenge(peer, key_id, HOST)["nonce"]
        eph = EphemeralKey()
        answer = self.service.release(peer, key_id, nonce, eph.public, evidence or [], HOST)
        lease, dek = eph.open_release(
            answer, nonce=b64d(nonce), client_spki_hash=peer.spki_hash, key_id=key_id,
            service_key=self.service.signer.public_key(),
        )  # fmt: skip
        return lease, bytes(dek)

    def events(self) -> list[dict[str, Any]]:
        entries = self.service.audit_log(0, 10_000)
        assert verify_entries(entries).ok
        return [json.loads(e["entry"]) for e in entries]


def make_rig(store: Store, tmp_path: Path, **kwargs: Any) -> Rig:
    clock = Clock()
    kwargs.setdefault("verifiers", verifiers_from_config())
    service = KeyService(
        store, LocalMasterKey.create(tmp_path / f"master-{os.urandom(4).hex()}.key"),
        ed25519.Ed25519PrivateKey.generate(), SETTINGS, clock=clock, **kwargs,
    )  # fmt: skip
    service.add_model("demo", "the demo model", ADMIN)
    dek = os.urandom(32)
    return Rig(service, clock, dek, service.register_key("demo", dek, ADMIN)["key_id"])


@pytest.fixture
def rig(store: Store, tmp_path: Path) -> Rig:
    return make_rig(store, tmp_path)


def refusal(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(Refused) as refused:
        call()
    return refused.value.status, refused.value.code


def refused_release(rig: Rig, peer: PeerIdentity, **kwargs: Any) -> tuple[int, str]:
    return refusal(lambda: rig.release(peer, **kwargs))


def spend(
    rig: Rig,
    peer: PeerIdentity,
    nonce: str,
    ephemeral: bytes | None = None,
    evidence: list[dict[str, Any]] | None = None,
) -> tuple[int, str]:
    """Ask for a release with this nonce: (200, "ok") or the refusal's (status, code)."""
    try:
        rig.service.release(peer, rig.key_id, nonce, ephemeral or EphemeralKey().public, evidence or [], HOST)
    except Refused as refused:
        return refused.status, refused.code
    return 200, "ok"


# --- grant and release -------------------------------------------------------------------------------------


def test_a_granted_host_gets_the_registered_key_under_a_signed_lease(rig: Rig) -> None:
    a, b = host("a"), host("b")
    g = rig.grant(a.spki)
    challenge = rig.service.challenge(a, rig.key_id, HOST)
    assert challenge["expires_at"] == T0 + 60 and challenge["evidence"] == []
    lease, dek = rig.release(a)
    assert dek == rig.dek
    assert (lease.model, lease.grant_id, lease.host, lease.key_id) == ("demo", g["grant_id"], a.spki, rig.key_id)
    assert (lease.issued_at, lease.renew_after, lease.expires_at, lease.grace_s) == (T0, T0 + 60, T0 + 300, 600)
    assert refused_release(rig, b) == (403, "not_granted")
    assert rig.service.granted_keys(a) == [{"key_id": rig.key_id, "model": "demo"}]
    assert rig.service.granted_keys(b) == []
    [listed] = rig.service.list_grants("demo")
    assert (listed["releases"], listed["hosts"]) == (1, 1)
    assert rig.service.list_models() == [{"name": "demo", "description": "the demo model", "created_at": T0, "keys": 1}]


def test_a_uri_prefix_grant_serves_every_host_under_it(rig: Rig) -> None:
    rig.grant("spiffe://td/prod/*")
    assert rig.release(host("a", "spiffe://td/prod/a"))[1] == rig.dek
    assert rig.release(host("b", "spiffe://td/prod/x/y"))[1] == rig.dek
    assert refused_release(rig, host("c", "spiffe://td/production/a")) == (403, "not_granted")


def test_admin_requests_are_checked_before_anything_is_stored(rig: Rig) -> None:
    service = rig.service
    assert refusal(lambda: service.add_model("demo", "", ADMIN)) == (409, "exists")
    assert refusal(lambda: service.add_model("../etc", "", ADMIN)) == (400, "bad_request")
    assert refusal(lambda: service.register_key("nope", os.urandom(32), ADMIN)) == (404, "unknown_model")
    assert refusal(lambda: service.register_key("demo", b"short", ADMIN)) == (400, "bad_request")
    assert refusal(lambda: rig.grant("host-a")) == (400, "bad_identity")
    assert refusal(lambda: rig.grant(host("a").spki, policy="licence.releases <")) == (400, "bad_policy")
    assert refusal(lambda: rig.grant(host("a").spki, evidence=[{"kind": "quantum"}])) == (400, "bad_request")
    assert refusal(lambda: service.add_grant("nope", {"identity": host("a").spki, "evidence": []}, ADMIN)) == (
        404, "unknown_model",
    )  # fmt: skip
    assert service.list_grants() == [] and [m["keys"] for m in service.list_models()] == [1]
    grant = rig.grant("SPIFFE://TD/prod/*", max_hosts=3, grace_s=5, evidence=[{"kind": "mtls"}])
    assert grant == {
        "grant_id": grant["grant_id"], "model": "demo", "identity": "spiffe://td/prod/*", "not_before": None,
        "not_after": None, "max_hosts": 3, "max_releases": None, "releases": 0, "policy": None, "grace_s": 5,
        "created_at": T0, "evidence": grant["evidence"], "revoked_at": None, "revoke_reason": None, "terms": {},
    }  # fmt: skip
    assert [r["kind"] for r in grant["evidence"]] == ["mtls"]
    assert service.list_grants() == [{**grant, "hosts": 0}]


# --- the nonce ---------------------------------------------------------------------------------------------


def test_a_nonce_is_single_use_and_bound_to_its_host_key_and_time(rig: Rig) -> None:
    a, b = host("a"), host("b")
    rig.grant(a.spki)
    rig.grant(b.spki)
    service = rig.service
    nonce = service.challenge(a, rig.key_id, HOST)["nonce"]
    eph = EphemeralKey().public
    assert spend(rig, a, nonce, eph) == (200, "ok")
    # the captured exchange replayed, with a new ephemeral key, by another host: all replays
    for peer, key in [(a, eph), (a, None), (b, None)]:
        assert spend(rig, peer, nonce, key) == (409, "nonce_reused")

    stolen = service.challenge(a, rig.key_id, HOST)["nonce"]
    assert spend(rig, b, stolen) == (403, "nonce_mismatch")
    assert spend(rig, a, stolen) == (409, "nonce_reused")  # the refused attempt spent it for its owner too

    other_key = service.register_key("demo", os.urandom(32), ADMIN)["key_id"]
    assert spend(rig, a, service.challenge(a, other_key, HOST)["nonce"]) == (403, "nonce_mismatch")
    assert spend(rig, a, b64e(bytes(32))) == (403, "nonce_unknown")
    assert spend(rig, a, "!!") == (400, "bad_request")
    assert refusal(lambda: service.challenge(a, "k_nope", HOST)) == (404, "unknown_key")

    late = service.challenge(a, rig.key_id, HOST)["nonce"]
    rig.clock.t += 61
    assert spend(rig, a, late) == (403, "nonce_expired")
    assert rig.release(a)[1] == rig.dek  # a fresh challenge works


def test_challenges_write_nothing_and_spent_nonces_are_forgotten_once_expired(rig: Rig) -> None:
    a = host("a")
    rig.grant(a.spki)
    entries = len(rig.service.store.audit_entries())
    nonces = [rig.service.challenge(a, rig.key_id, HOST)["nonce"] for _ in range(5)]

    def recorded(nonce: str) -> bool:
        with rig.service.store.transaction() as tx:
            return tx.challenge(nonce) is not None

    assert len(set(nonces)) == 5 and not any(recorded(n) for n in nonces)
    assert len(rig.service.store.audit_entries()) == entries
    assert spend(rig, a, nonces[0]) == (200, "ok")
    assert recorded(nonces[0]) and not recorded(nonces[1])
    rig.clock.t += 3600  # expired, and still kept (an hour's margin for replicas' clocks)
    assert spend(rig, a, nonces[0]) == (409, "nonce_reused")
    for _ in range(64):
        rig.release(a)
    assert recorded(nonces[0])
    rig.clock.t += 61
    for _ in range(64):  # releases purge long-expired spent nonces now and then
        rig.release(a)
    assert not recorded(nonces[0])
    assert spend(rig, a, nonces[0]) == (403, "nonce_expired")  # its own expiry still refuses it


def test_a_nonce_made_by_another_key_service_or_altered_is_unknown(rig: Rig) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from modelseal.keyserver.challenges import ChallengeTokens

    a = host("a")
    rig.grant(a.spki)
    foreign = ChallengeTokens(ed25519.Ed25519PrivateKey.generate()).issue(a.spki, rig.key_id, rig.clock.t + 60)
    assert spend(rig, a, b64e(foreign)) == (403, "nonce_unknown")
    mine = bytearray(b64d(rig.service.challenge(a, rig.key_id, HOST)["nonce"]))
    mine[9] ^= 1  # a later expiry
    assert spend(rig, a, b64e(bytes(mine))) == (403, "nonce_unknown")


# --- grant limits, expiry, policy, evidence ---------------------------------------------------------------


def test_grant_validity_window_and_lease_capped_by_it(rig: Rig) -> None:
    a = host("a")
    rig.grant(a.spki, not_before=T0 + 100, not_after=T0 + 200)
    assert refused_release(rig, a) == (403, "not_yet_valid")
    rig.clock.t = T0 + 150
    lease, _ = rig.release(a)
    assert (lease.expires_at, lease.renew_after) == (T0 + 200, T0 + 200)  # not past the grant's end
    assert rig.service.granted_keys(a) != []
    rig.clock.t = T0 + 200
    assert refused_release(rig, a) == (403, "expired")
    assert rig.service.granted_keys(a) == []


def test_licence_limits_count_releases_and_hosts(rig: Rig) -> None:
    rig.grant("spiffe://td/a/*", max_releases=2)
    a1 = host("a1", "spiffe://td/a/1")
    rig.release(a1)
    rig.release(a1)
    assert refused_release(rig, a1) == (403, "release_limit")

    rig.grant("spiffe://td/b/*", max_hosts=1)
    b1, b2 = host("b1", "spiffe://td/b/1"), host("b2", "spiffe://td/b/2")
    rig.release(b1)
    rig.release(b1)  # the same host again is not a new host
    assert refused_release(rig, b2) == (403, "host_limit")
    uses = {g["identity"]: (g["releases"], g["hosts"]) for g in rig.service.list_grants()}
    assert uses == {"spiffe://td/a/*": (2, 1), "spiffe://td/b/*": (2, 1)}


def test_policy_sees_licence_identity_and_time(rig: Rig) -> None:
    a, b, c = host("a", "spiffe://td/p/a"), host("b", "spiffe://td/p/b"), host("c", "spiffe://td/q/c")
    rig.grant("spiffe://td/p/*", policy="licence.releases < 1 && 'spiffe://td/p/a' in identity")
    assert refused_release(rig, b) == (403, "policy_denied")
    rig.release(a)
    assert refused_release(rig, a) == (403, "policy_denied")  # licence.releases is now 1
    rig.grant(c.spki, policy="now < timestamp('2000-01-01T00:00:00Z')")
    assert refused_release(rig, c) == (403, "policy_denied")


def test_evidence_requirements_and_the_services_own_verifiers(store: Store, tmp_path: Path) -> None:
    rig = make_rig(store, tmp_path, verifiers={"mtls": MtlsVerifier()})
    assert rig.service.evidence_kinds == ["mtls"]
    assert refusal(lambda: rig.grant(host("a").spki, evidence=[{"kind": "tpm"}])) == (400, "bad_request")
    a = host("a")
    rig.grant(a.spki, evidence=[{"kind": "mtls"}])
    lease, _ = rig.release(a, evidence=[{"kind": "mtls"}, {"kind": "tpm"}])  # unknown extra evidence is ignored
    assert lease.host == a.spki
    assert refused_release(rig, a, evidence=[{"kind": "mtls"}] * 9) == (400, "bad_request")  # at most 8

    full = make_rig(MemoryStore(), tmp_path)
    assert {"mtls", "tpm", "sev-snp"} <= set(full.service.evidence_kinds)
    b = host("b")
    full.grant(b.spki, evidence=[{"kind": "sev-snp", "measurements": {"measurement": "00" * 48}}])
    assert full.service.challenge(b, full.key_id, HOST)["evidence"] == ["sev-snp"]
    assert refused_release(full, b) == (403, "evidence_required")
    assert refused_release(full, b, evidence=[{"kind": "sev-snp", "report": "AA"}]) == (403, "evidence_rejected")
    why = [e["why"] for e in full.events() if e.get("code") == "evidence_rejected"]
    assert why and why[0].startswith("sev-snp evidence rejected")


# --- revocation and renewal --------------------------------------------------------------------------------


def test_renewal_is_a_new_release_until_the_grant_is_revoked(rig: Rig) -> None:
    a = host("a")
    g = rig.grant(a.spki, grace_s=30)
    first, _ = rig.release(a)
    rig.clock.t += 60  # renew_after
    renewed, dek = rig.release(a)
    assert dek == rig.dek and renewed.lease_id != first.lease_id
    assert (renewed.issued_at, renewed.expires_at, renewed.grace_s) == (T0 + 60, T0 + 360, 30)
    [listed] = rig.service.list_grants()
    assert (listed["releases"], listed["hosts"]) == (2, 1)

    rig.clock.t += 1
    assert rig.service.revoke_grant(g["grant_id"], "contract ended", ADMIN) == {
        "grant_id": g["grant_id"], "model": "demo", "revoked": True,
    }  # fmt: skip
    with pytest.raises(Refused, match="revoked: contract ended") as refused:
        rig.release(a)
    assert refused.value.code == "revoked"
    assert rig.service.granted_keys(a) == []
    # revoking again changes nothing (the first time and reason stay)
    rig.service.revoke_grant(g["grant_id"], "again", ADMIN)
    [listed] = rig.service.list_grants()
    assert (listed["revoked_at"], listed["revoke_reason"]) == (T0 + 61, "contract ended")
    assert refusal(lambda: rig.service.revoke_grant("g_nope", "x", ADMIN)) == (404, "unknown_grant")

    rig.grant(a.spki)  # a new grant: the same host is served again
    assert rig.release(a)[1] == rig.dek


def test_master_key_rotation_rewraps_every_key_and_releases_continue(rig: Rig) -> None:
    a = host("a")
    rig.grant(a.spki)
    second = os.urandom(32)
    second_id = rig.service.register_key("demo", second, ADMIN)["key_id"]
    assert rig.service.rotate_master_key(ADMIN) == {"version": "local:2", "rewrapped": 2}
    assert rig.release(a)[1] == rig.dek
    assert rig.release(a, key_id=second_id)[1] == second


# --- the audit chain -------------------------------------------------------------------------------------


def test_every_decision_is_audited_in_one_chain_without_secrets(rig: Rig) -> None:
    a, b = host("a"), host("b")
    g = rig.grant(a.spki)
    lease, _ = rig.release(a)
    refused_release(rig, b)
    rig.service.revoke_grant(g["grant_id"], "done", ADMIN)
    events = rig.events()
    assert [(e["event"], e["decision"], e.get("code")) for e in events] == [
        ("model.add", "ok", None),
        ("key.register", "ok", None),
        ("grant.add", "ok", None),
        ("release", "ok", None),
        ("release", "refused", "not_granted"),
        ("grant.revoke", "ok", None),
    ]  # challenges are not audited: only the releases they lead to
    ok = events[3]
    assert (ok["grant_id"], ok["lease_id"], ok["host"], ok["attested"]) == (g["grant_id"], lease.lease_id, a.spki, {})
    assert "wrapped_key" not in ok and "lease" not in ok
    text = json.dumps(events)
    assert b64e(rig.dek) not in text and rig.dek.hex() not in text
    assert events[4]["host"] == b.spki and b.spki in events[4]["why"]

    entries = rig.service.audit_log(0, 10_000)
    assert [e["seq"] for e in entries] == list(range(1, 7))
    assert [e["seq"] for e in rig.service.audit_log(2, 3)] == [3, 4, 5]
    assert entries[0]["prev_hash"] == "0" * 64
    assert all(later["prev_hash"] == e["hash"] for e, later in itertools.pairwise(entries))
    forged = [dict(e) for e in entries]
    forged[3]["entry"] = forged[3]["entry"].replace(a.spki, b.spki)
    assert verify_entries(forged).problem == "entry 4 was modified (hash mismatch)"


def test_refusals_past_the_burst_are_counted_then_written_as_one_summary(store: Store, tmp_path: Path) -> None:
    rig = make_rig(store, tmp_path, refusals=RefusalSettings(burst=2, interval_s=60))
    b = host("b")
    for _ in range(7):
        assert refused_release(rig, b) == (403, "not_granted")
    for _ in range(4):  # refused before any decision (as the HTTP layer does for a malformed body)
        rig.service.audit_refusal({"event": "release", **HOST}, 400, "malformed_json", "bad JSON")
    before = len(rig.service.store.audit_entries())
    assert before == 2 + 2 + 2  # model, key, two full refusals of each kind
    events = rig.events()  # reading the log writes the counts first
    summaries = {e["code"]: e for e in events if e.get("summary")}
    assert (summaries["not_granted"]["count"], summaries["malformed_json"]["count"]) == (5, 2)
    assert summaries["not_granted"]["host"] == b.spki and summaries["malformed_json"]["remote"] == "127.0.0.1"
    assert rig.service.flush_refusals() == 0


def test_a_refusal_commits_its_audit_record_and_spent_nonce_but_a_failure_rolls_back(rig: Rig) -> None:
    a = host("a")
    rig.grant(a.spki)
    nonce = rig.service.challenge(a, rig.key_id, HOST)["nonce"]
    twice = [{"kind": "tpm"}, {"kind": "tpm"}]  # refused before the transaction, audited inside it
    assert spend(rig, a, nonce, evidence=twice) == (400, "bad_request")
    assert spend(rig, a, nonce) == (409, "nonce_reused")
    codes = [e.get("code") for e in rig.events()]
    assert codes[-2:] == ["bad_request", "nonce_reused"]

    entries = len(rig.service.store.audit_entries())
    with pytest.raises(RuntimeError), rig.service.store.transaction() as tx:
        tx.add_model(ModelRecord("half-done", "", T0))
        tx.append_audit({"event": "model.add", "model": "half-done"})
        raise RuntimeError("the process fails halfway")
    assert [m["name"] for m in rig.service.list_models()] == ["demo"]
    assert len(rig.service.store.audit_entries()) == entries
    rig.service.add_model("after", "", ADMIN)  # the chain continues from the committed head
    assert verify_entries(rig.service.audit_log(0, 10_000)).ok


# --- the stores themselves --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite-file", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_concurrent_transactions_serialise_on_the_audit_head(kind: str, tmp_path: Path) -> None:
    with new_store(kind, tmp_path) as store:

        def writer(n: int) -> None:
            for i in range(10):
                with store.transaction() as tx:
                    tx.append_audit({"writer": n, "i": i})

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        entries = [e.to_json() for e in store.audit_entries()]
        assert len(entries) == 40 and verify_entries(entries).ok


def test_the_memory_store_keeps_the_schemas_constraints() -> None:
    store = MemoryStore()
    with pytest.raises(StoreIntegrityError), store.transaction() as tx:
        tx.add_model(ModelRecord("m", "", T0))
        tx.add_model(ModelRecord("m", "", T0))
    assert store.models() == []  # the failed transaction left nothing behind
