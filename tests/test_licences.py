"""Licences at the key service: terms in the lease, usage reports from the agent's real usage log, quotas
re-checked at renewal, usage in CEL, the per-licence report; and every attack on a report we could think
of (tampered, forged, replayed, rolled back, withheld, backdated, another host's log or grant, malformed).

The service is called directly (no HTTP) on each store, with the agent's real :class:`UsageLog` writing
a real file; the clock is the service's own. The same flows over real processes (agent socket, meter,
renewals, restarts) are in ``test_licences_e2e.py``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelseal.agent.usagelog import Counted, UsageLog, UsageLogFullError
from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, UsageError
from modelseal.keyserver.service import Refused
from modelseal.keyserver.store import Store
from modelseal.pki import PeerIdentity
from modelseal.release.protocol import EphemeralKey, Lease
from modelseal.release.terms import Terms, Usage
from modelseal.release.usage import (
    ChainVerifier,
    UsageLogError,
    canonical,
    digest,
    head_message,
    parse_line,
    public_key_text,
    sign_entry,
)

from .test_keyservice_decisions import HOST, T0, Rig, host, make_rig, refusal, store  # noqa: F401  (fixture)

DAY = 86400


def host_key(directory: Path, name: str) -> Path:
    path = directory / f"{name}.key"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    return path


class Host:
    """A host as the key service sees it (``peer``) with its agent's real usage log."""

    def __init__(self, rig: Rig, directory: Path, name: str) -> None:
        self.rig, self.peer, self.directory = rig, host(name), directory
        self.key_file = host_key(directory, name)
        self.log_path = directory / f"{name}-usage.log"
        self.log = self.open_log()

    def twin(self, name: str) -> Host:
        """Another agent with this host's certificate (a node pool): its own log."""
        other = Host.__new__(Host)
        other.rig, other.peer, other.directory, other.key_file = self.rig, self.peer, self.directory, self.key_file
        other.log_path = self.directory / f"{name}-usage.log"
        other.log = other.open_log()
        return other

    def open_log(self) -> UsageLog:
        log = UsageLog.open(self.log_path, self.key_file, self.peer.spki)
        log.clock = self.rig.clock
        return log

    def count(self, grant: str, report: int, source: str = "1000.serve-1", **usage: int) -> int:
        return self.log.record(source, report, [Counted(self.rig.key_id, grant, "demo", Usage(**usage))])

    def release(self, report: Any = "log") -> Lease:
        """Challenge and release carrying ``report`` ("log": the real log's report for this nonce)."""
        challenge = self.rig.service.challenge(self.peer, self.rig.key_id, HOST, self.log.log_id)
        nonce = challenge["nonce"]
        if report == "log":
            report = self.log.report(challenge["usage_seq"], b64d(nonce))
        eph = EphemeralKey()
        answer = self.rig.service.release(self.peer, self.rig.key_id, nonce, eph.public, [], HOST, report)
        lease, _ = eph.open_release(
            answer, nonce=b64d(nonce), client_spki_hash=self.peer.spki_hash, key_id=self.rig.key_id,
            service_key=self.rig.service.signer.public_key(),
        )  # fmt: skip
        return lease

    def refused(self, report: Any = "log") -> tuple[int, str, str]:
        with pytest.raises(Refused) as refused:
            self.release(report)
        return refused.value.status, refused.value.code, str(refused.value)


@pytest.fixture
def rig(store: Store, tmp_path: Path) -> Rig:  # noqa: F811
    return make_rig(store, tmp_path)


@pytest.fixture
def a(rig: Rig, tmp_path: Path) -> Host:
    return Host(rig, tmp_path, "a")


def metered(rig: Rig, peer: PeerIdentity, **terms: Any) -> str:
    return str(rig.grant(peer.spki, terms={"metered": True, **terms})["grant_id"])


def licensed(rig: Rig, holder: Host, **terms: Any) -> str:
    """A metered grant for ``holder``, which then takes its first lease (counts need one to belong to)."""
    grant = metered(rig, holder.peer, **terms)
    holder.release()
    return grant


def usage_rows(rig: Rig, **query: Any) -> list[dict[str, Any]]:
    return rig.service.usage_report(0, rig.clock.t + 1, DAY, **query)


# --- terms ---------------------------------------------------------------------------------------------


def test_terms_are_strict_and_limits_imply_metering() -> None:
    terms = Terms.from_json({"max_requests": 5, "period_s": 3600, "rate": 2, "licence": "acme-7"})
    assert terms.metered and terms.limited and terms.to_json() == {
        "metered": True, "max_requests": 5, "period_s": 3600, "rate": 2.0, "licence": "acme-7",
    }  # fmt: skip
    assert Terms.from_json({}) == Terms() and Terms().to_json() == {}
    assert terms.exceeded(Usage(requests=5)) is None
    assert terms.exceeded(Usage(requests=5), Usage(requests=1)) == "max_requests 5 per hour reached (requests used: 5)"
    assert Terms(max_tokens=10).exceeded(Usage(input_tokens=6, output_tokens=5)).startswith("max_tokens 10")
    bad: list[Any] = [
        [], {"max_requests": -1}, {"max_requests": True}, {"max_requests": 1.5}, {"period_s": 5},
        {"rate": 0}, {"rate": float("inf")}, {"rate": "2"}, {"metered": 1}, {"licence": ""}, {"licence": "a\nb"},
        {"licence": "x" * 129}, {"max_request": 5}, {"max_requests": 2**60}, {"rate": 10**400},
    ]  # fmt: skip
    for data in bad:
        with pytest.raises(FormatError):
            Terms.from_json(data)


@given(st.dictionaries(st.sampled_from(["requests", "items", "input_tokens", "output_tokens", "other"]),
                       st.one_of(st.integers(-5, 2**54), st.booleans(), st.text(max_size=3), st.none())))  # fmt: skip
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_usage_counts_parse_strictly_or_fail_with_a_format_error(data: dict[str, Any]) -> None:
    try:
        usage = Usage.from_json(data)
    except FormatError:
        return
    assert all(isinstance(v, int) and 0 <= v < 2**53 for v in usage.to_json().values())


def test_a_grant_with_bad_terms_is_refused(rig: Rig) -> None:
    assert refusal(lambda: rig.grant(host("a").spki, terms={"max_requests": "lots"})) == (400, "bad_request")
    assert refusal(lambda: rig.grant(host("a").spki, terms=["max_requests"])) == (400, "bad_request")


# --- metering through renewals --------------------------------------------------------------------------


def test_terms_and_usage_travel_in_the_signed_lease(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a, max_requests=100, licence="acme-7")
    lease = a.release()
    assert lease.terms == {"metered": True, "max_requests": 100, "licence": "acme-7"}
    assert lease.usage == {"period_start": T0 - T0 % DAY, "used": Usage().to_json(), "seq": 1}
    a.count(grant, 1, requests=3, items=24)
    lease = a.release()
    assert lease.usage["used"] == {"requests": 3, "items": 24, "input_tokens": 0, "output_tokens": 0}
    assert lease.usage["seq"] == 2
    unmetered = rig.grant(host("b").spki)
    assert Host(rig, a.directory, "b").release(None).terms == {} and unmetered["terms"] == {}


def test_usage_is_counted_once_and_reported_per_licence_and_period(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a, licence="acme-7")
    assert a.count(grant, 1, requests=2, items=5) == 1
    assert a.count(grant, 1, requests=2, items=5) == 0  # the same report resent after a lost answer
    assert a.count(grant, 2, requests=1, items=1, input_tokens=10, output_tokens=4) == 1
    a.release()
    a.release()  # nothing new: nothing counted twice
    rig.clock.t += DAY
    a.release()  # the agent renewed all along
    a.count(grant, 3, requests=7, items=7)
    a.release()
    rows = usage_rows(rig)
    assert [(r["licence"], r["period_start"], r["requests"], r["items"], r["tokens"]) for r in rows] == [
        ("acme-7", T0 - T0 % DAY, 3, 6, 14), ("acme-7", T0 - T0 % DAY + DAY, 7, 7, 0),
    ]  # fmt: skip
    assert usage_rows(rig, grant_id="g_none") == [] and len(usage_rows(rig, model="demo")) == 2
    reports = [e for e in rig.events() if e["event"] == "usage.report"]
    assert [(e["from_seq"], e["to_seq"], e["counted"]) for e in reports] == [(1, 1, 0), (2, 3, 2), (4, 4, 1)]
    for event in reports:  # the audit chain holds the entries as the agent signed them
        assert all(parse_line(line.encode()) for line in event["entries"])


def test_usage_survives_a_restart_of_the_agent_exactly_once(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a)
    a.count(grant, 1, requests=4, items=4)
    a.log.close()
    a.log = a.open_log()  # the agent restarted: same key (from the host key), same chain, same dedup
    assert a.count(grant, 1, requests=4, items=4) == 0
    assert a.count(grant, 2, requests=1, items=1) == 1
    a.release()
    assert usage_rows(rig)[0]["requests"] == 5


def test_agents_sharing_a_certificate_keep_one_chain_each(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a, max_requests=10)
    twin = a.twin("node-2")
    assert twin.log.log_id != a.log.log_id and twin.log.public_key() == a.log.public_key()
    a.count(grant, 1, requests=4)
    twin.count(grant, 1, requests=4)
    a.release()
    assert twin.release().usage["used"]["requests"] == 8  # the grant's usage over both chains
    twin.count(grant, 2, requests=3)
    assert twin.refused()[1] == "quota_exceeded"


def test_a_torn_last_line_is_cut_off_and_damage_elsewhere_stops_the_agent(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a)
    a.count(grant, 1, requests=1)
    a.log.close()
    with a.log_path.open("ab") as f:
        f.write(b'{"at":17')  # a crash in the middle of an append
    a.log = a.open_log()
    assert a.log.head.seq == 2 and a.log_path.read_bytes().endswith(b"\n")
    a.count(grant, 2, requests=1)
    a.release()
    a.log.close()
    lines = a.log_path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"requests":1', b'"requests":0')
    a.log_path.write_bytes(b"\n".join(lines))
    with pytest.raises(UsageError, match="damaged at line 2: usage entry 2 is not signed"):
        a.open_log()
    with pytest.raises(UsageError, match="belongs to another host"):
        UsageLog.open(a.log_path.with_name("x.log"), a.key_file, a.peer.spki).close()
        UsageLog.open(a.log_path.with_name("x.log"), a.key_file, host("z").spki)


def test_a_quota_past_its_limit_refuses_renewal_until_the_next_period(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a, max_requests=5, period_s=3600)
    a.release()
    a.count(grant, 1, requests=5)
    a.release()  # at the limit: still within it
    a.count(grant, 2, requests=1)
    status, code, message = a.refused()
    assert (status, code) == (403, "quota_exceeded") and "max_requests 5 per hour reached (requests used: 6)" in message
    rig.clock.t += 3600 - T0 % 3600  # the next period
    assert a.release().usage["used"]["requests"] == 0


def test_a_quota_counts_every_host_of_the_grant(rig: Rig, tmp_path: Path) -> None:
    rig.grant("spiffe://td/acme/*", terms={"max_items": 10})
    one, two = Host(rig, tmp_path, "one"), Host(rig, tmp_path, "two")
    one.peer, two.peer = host("one", "spiffe://td/acme/one"), host("two", "spiffe://td/acme/two")
    one.log, two.log = one.open_log(), two.open_log()
    grant = rig.service.list_grants("demo")[0]["grant_id"]
    one.release()
    two.release()
    one.count(grant, 1, items=6)
    one.release()
    two.count(grant, 1, items=6)
    assert two.refused()[1] == "quota_exceeded"
    assert one.refused()[1] == "quota_exceeded"


def test_usage_is_visible_to_grant_policies(rig: Rig, a: Host) -> None:
    grant = str(rig.grant(a.peer.spki, terms={"metered": True}, policy="usage.items_today < 10")["grant_id"])
    a.release()
    a.count(grant, 1, items=9)
    a.release()
    a.count(grant, 2, items=1)
    assert a.refused()[1] == "policy_denied"


# --- attacks on reports ---------------------------------------------------------------------------------


def held_back(holder: Host, nonce: bytes, keep: int) -> dict[str, Any]:
    """The agent's report for ``nonce`` with only its first ``keep`` entries (an agent withholding the rest,
    honestly counted in its signed head statement)."""
    full = holder.log.report(holder.rig.service.store.usage_seq(holder.peer.spki, holder.log.log_id), nonce)
    entries = full["entries"][:keep]
    last = parse_line(entries[-1].encode())[0]["seq"]
    pending = holder.log.head.seq - last
    head = digest(entries[-1].encode())
    sig = holder.log._key().sign(head_message(last, head, nonce, pending))
    return {"log": holder.log.log_id, "entries": entries,
            "head": {"seq": last, "digest": b64e(head), "pending": pending, "sig": b64e(sig)}}  # fmt: skip


def test_a_metered_grant_needs_a_report_with_every_release_and_a_drained_backlog(rig: Rig, a: Host) -> None:
    """Every release of a metered key carries the releasing agent's report: an agent without a usage log
    gets none, even while another agent of the same host reports. A backlog may stand for report_grace_s."""
    grant = licensed(rig, a, report_grace_s=600)
    assert a.refused(None)[:3] == (403, "usage_required", "grant " + grant + " is metered: every release needs "
                                   "the agent's usage report (the host agent needs usage_log in its config)")
    for report in range(1, 11):
        a.count(grant, report, requests=1)
    challenge = rig.service.challenge(a.peer, rig.key_id, HOST, a.log.log_id)
    eph = EphemeralKey()
    rig.service.release(a.peer, rig.key_id, challenge["nonce"], eph.public, [], HOST,
                        held_back(a, b64d(challenge["nonce"]), 3))  # 7 entries held back: allowed for now
    rig.clock.t += 601
    challenge = rig.service.challenge(a.peer, rig.key_id, HOST, a.log.log_id)
    with pytest.raises(Refused, match="held back usage entries for 601 s \\(6 now; grace 600 s\\)"):
        rig.service.release(a.peer, rig.key_id, challenge["nonce"], EphemeralKey().public, [], HOST,
                            held_back(a, b64d(challenge["nonce"]), 1))
    a.release()  # everything sent: served again
    assert usage_rows(rig)[0]["requests"] == 10


def test_a_replayed_report_is_refused(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a)
    a.count(grant, 1, requests=1)
    challenge = rig.service.challenge(a.peer, rig.key_id, HOST, a.log.log_id)
    old = a.log.report(challenge["usage_seq"], b64d(challenge["nonce"]))
    a.release()
    assert "repeats or rolls back" in a.refused(old)[2]  # entries already accepted
    head_only = {"log": a.log.log_id, "entries": [], "head": old["head"]}
    assert "head statement" in a.refused(head_only)[2]  # the head statement was signed for another nonce


def test_a_tampered_entry_and_a_forged_signature_are_refused(rig: Rig, a: Host, tmp_path: Path) -> None:
    grant = licensed(rig, a)
    a.count(grant, 1, requests=10)
    a.release()  # the log's key is pinned
    a.count(grant, 2, requests=10)
    challenge = rig.service.challenge(a.peer, rig.key_id, HOST, a.log.log_id)
    report = a.log.report(challenge["usage_seq"], b64d(challenge["nonce"]))
    tampered = {**report, "entries": [report["entries"][0].replace('"requests":10', '"requests":1', 1)]}
    assert "not signed by the log's key" in a.refused(tampered)[2]
    body, _ = parse_line(report["entries"][0].encode())  # the same entry, signed by another key
    forged = {**report, "entries": [sign_entry(body, ed25519.Ed25519PrivateKey.generate()).decode()]}
    assert "not signed by the log's key" in a.refused(forged)[2]
    other = UsageLog.open(tmp_path / "forger.log", host_key(tmp_path, "forger"), a.peer.spki)
    other.clock = rig.clock
    other.record("1000.s", 1, [Counted(rig.key_id, grant, "demo", Usage(requests=1))])
    lying = other.report(challenge["usage_seq"], b64d(challenge["nonce"]))  # another log, named as a's
    lying["log"] = a.log.log_id
    assert "rolled back or replaced" in a.refused(lying)[2]


def test_a_rolled_back_log_is_refused_until_the_owner_resets_the_host(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a)
    a.count(grant, 1, requests=5)
    a.release()
    saved = a.log_path.read_bytes()
    a.count(grant, 2, requests=50)
    a.release()
    a.log.close()
    a.log_path.write_bytes(saved)  # the host restores yesterday's log to undo 50 requests
    a.log = a.open_log()
    a.count(grant, 3, requests=1)
    assert "rolled back or replaced" in a.refused()[2]
    rig.service.reset_usage(a.peer.spki, a.log.log_id, "restored a backup", {"actor": "admin"})
    a.release()  # accepted as a new chain; entries already counted are not counted again
    assert usage_rows(rig)[0]["requests"] == 56
    assert refusal(lambda: rig.service.reset_usage("spki:nobody", None, "", {})) == (404, "unknown_host")


def test_totals_that_do_not_add_up_are_refused_even_when_signed(rig: Rig, a: Host) -> None:
    """The host holds its log key, so it can sign anything: the chain's arithmetic still catches a rollback
    of the totals."""
    grant = licensed(rig, a)
    a.count(grant, 1, requests=5)
    a.release()
    key = a.log._key()
    body = {"v": 1, "seq": a.log.head.seq + 1, "prev": b64e(a.log.head.digest), "at": rig.clock.t, "kind": "usage",
            "grant": grant, "key_id": rig.key_id, "model": "demo", "source": "1000.x", "source_seq": 9,
            "delta": Usage(requests=1).to_json(), "total": Usage(requests=1).to_json()}  # fmt: skip
    challenge = rig.service.challenge(a.peer, rig.key_id, HOST, a.log.log_id)
    line = sign_entry(body, key)
    head = {"seq": body["seq"], "digest": b64e(digest(line)), "pending": 0,
            "sig": b64e(key.sign(head_message(body["seq"], digest(line), b64d(challenge["nonce"]), 0)))}  # fmt: skip
    report = {"log": a.log.log_id, "entries": [line.decode()], "head": head}
    nonce, eph = challenge["nonce"], EphemeralKey()
    with pytest.raises(Refused, match="do not add up"):
        rig.service.release(a.peer, rig.key_id, nonce, eph.public, [], HOST, report)


def test_usage_is_counted_between_reports_whatever_the_host_clock_says(rig: Rig, a: Host) -> None:
    """Entries keep the host's dates, signed; the service counts each within the window it can vouch for
    (after the log's previous report, not after now), so no clock moves usage into another period."""
    grant = licensed(rig, a, max_requests=5, period_s=3600)
    rig.clock.t += 3600 - T0 % 3600  # a new period
    a.release()
    a.log.clock = lambda: rig.clock.t - 3600  # the host dates new usage into the period that has closed
    a.count(grant, 1, requests=6)
    assert a.refused()[1] == "quota_exceeded"  # counted in this period all the same
    [row] = rig.service.usage_report(0, rig.clock.t + 1, 3600, grant_id=grant)
    assert row["period_start"] == rig.clock.t and row["requests"] == 6
    rig.clock.t += 3600
    a.release()  # the next period: the key again
    a.log.clock = lambda: rig.clock.t + 365 * DAY  # a clock that jumps a year ahead refuses nothing
    a.count(grant, 2, requests=1)
    a.release()
    a.log.clock = rig.clock  # and back: the chain's dates stay monotonic, the service counts them now
    a.count(grant, 3, requests=1)
    assert a.release().usage["used"]["requests"] == 2
    hours = rig.service.usage_report(0, rig.clock.t + 1, 3600, grant_id=grant)
    assert [(r["period_start"], r["requests"]) for r in hours] == [(rig.clock.t - 3600, 6), (rig.clock.t, 2)]


def test_usage_for_a_grant_the_host_does_not_hold_is_refused(rig: Rig, a: Host, tmp_path: Path) -> None:
    metered(rig, a.peer)
    victim = metered(rig, host("victim"))
    a.count(victim, 1, requests=1000)  # bill another customer
    assert "which this host does not hold" in a.refused()[2]
    b = Host(rig, tmp_path, "b")
    metered(rig, b.peer)
    challenge = rig.service.challenge(b.peer, rig.key_id, HOST, a.log.log_id)
    assert "opened by host" in b.refused(a.log.report(0, b64d(challenge["nonce"])))[2]


@pytest.mark.parametrize(
    "report",
    [[], "x", {"entries": "x"}, {"entries": [1]}, {"entries": ["{}"] * 65}, {"entries": ["[" * 5000]},
     {"entries": ["x" * 5000]}, {"entries": [], "head": []}, {"entries": [], "head": {"seq": "1"}},
     {"entries": ['{"kind":"open"}']}],
)  # fmt: skip
def test_malformed_reports_are_refused_cleanly(rig: Rig, a: Host, report: Any) -> None:
    metered(rig, a.peer)
    status, code, _ = a.refused(report)
    assert (status, code) == (403, "usage_rejected")


@given(st.integers(0, 10_000), st.integers(0, 7))
@settings(max_examples=150, deadline=None)
def test_any_flipped_bit_in_a_log_line_fails_verification(position: int, bit: int) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    lines = [sign_entry({"v": 1, "seq": 1, "prev": "", "at": T0, "kind": "open", "host": "spki:x",
                         "key": public_key_text(key.public_key()), "log": "L" * 16}, key)]  # fmt: skip
    verifier = ChainVerifier()
    verifier.add(lines[0])
    body = {"v": 1, "seq": 2, "prev": b64e(verifier.head.digest), "at": T0, "kind": "usage", "grant": "g_1",
            "key_id": "k_1", "model": "demo", "source": "1000.s", "source_seq": 1,
            "delta": Usage(requests=3).to_json(), "total": Usage(requests=3).to_json()}  # fmt: skip
    line = bytearray(sign_entry(body, key))
    line[position % len(line)] ^= 1 << bit
    with pytest.raises((UsageLogError, FormatError)):
        verifier.add(bytes(line))


def test_log_entries_hold_no_key_material(rig: Rig, a: Host) -> None:
    grant = licensed(rig, a)
    a.count(grant, 1, requests=1)
    text = a.log_path.read_text()
    seed = bytes(a.log._seed.view())
    assert seed.hex() not in text and b64e(seed) not in text and rig.dek.hex() not in text
    assert oct(a.log_path.stat().st_mode & 0o777) == "0o600"
    assert all(json.loads(line)["v"] == 1 for line in text.splitlines())
    assert canonical(json.loads(text.splitlines()[1])).decode() == text.splitlines()[1]


# --- review findings (each attack that used to work) ----------------------------------------------------


def test_counts_that_would_take_a_total_past_2_53_are_refused_not_logged(rig: Rig, a: Host) -> None:
    """Two huge counts used to be logged and signed, after which every report failed to verify and the
    host never got a key again."""
    grant = licensed(rig, a)
    a.count(grant, 1, requests=2**53 - 2)
    with pytest.raises(UsageLogFullError, match="past 2\\*\\*53"):
        a.count(grant, 2, requests=5)
    assert a.log.head.seq == 2
    a.release()  # still verifies


def test_a_failed_append_leaves_no_fragment_in_the_log(tmp_path: Path) -> None:
    """A short write (disk full) used to leave part of a line before the next entry: the log was damaged
    at the next start. Run in a child process: it lowers its own file-size limit."""
    script = f"""
import resource, signal
from pathlib import Path
from modelseal.agent.usagelog import Counted, UsageLog, UsageLogFullError
from modelseal.release.terms import Usage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path({str(tmp_path / "usage.log")!r})
log = UsageLog.open(path, {str(host_key(tmp_path, "h"))!r}, "spki:h")
size = path.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
try:
    log.record("1.s", 1, [Counted("k_1", "g_1", "demo", Usage(requests=1))])
except OSError as exc:
    print("refused:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
assert path.stat().st_size == size, "a fragment was left"
log.record("1.s", 2, [Counted("k_1", "g_1", "demo", Usage(requests=2))])
log.close()
again = UsageLog.open(path, {str(tmp_path / "h.key")!r}, "spki:h")
print("entries", again.head.seq, again.head.totals["g_1"].requests)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "refused: short write" in done.stdout or "refused: [Errno 27]" in done.stdout
    assert "entries 2 2" in done.stdout


def test_usage_cannot_be_billed_to_a_grant_that_did_not_lease_the_key_then(rig: Rig, a: Host) -> None:
    """A host holding a quota'd grant and an old one used to log its usage under the old one (revoked,
    expired or unmetered) and keep its quota untouched."""
    old = licensed(rig, a)
    rig.service.revoke_grant(old, "replaced by a metered licence", {"actor": "admin"})
    rig.clock.t += 3600  # the old grant's last lease is long over
    current = licensed(rig, a, max_requests=5)
    a.count(old, 1, requests=1_000_000)
    assert "leased it to this host at no time near then" in a.refused()[2]
    assert current != old


def test_names_in_entries_are_checked_before_any_reaches_the_store() -> None:
    """A grant id with a NUL byte used to reach PostgreSQL (a 500 that also un-spent the nonce)."""
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = ChainVerifier()
    verifier.add(sign_entry({"v": 1, "seq": 1, "prev": "", "at": T0, "kind": "open", "host": "spki:x",
                             "key": public_key_text(key.public_key()), "log": "L" * 16}, key))  # fmt: skip
    for name, value in (("grant", "g_\x00x"), ("key_id", "k 1"), ("model", "../x"), ("source", "s")):
        body = {"v": 1, "seq": 2, "prev": b64e(verifier.head.digest), "at": T0, "kind": "usage", "grant": "g_1",
                "key_id": "k_1", "model": "demo", "source": "1.s", "source_seq": 1,
                "delta": Usage(requests=1).to_json(), "total": Usage(requests=1).to_json(), name: value}  # fmt: skip
        with pytest.raises(UsageLogError, match=f"{name} does not have the syntax"):
            ChainVerifier(dataclasses.replace(verifier.head)).add(sign_entry(body, key))
    true_version = sign_entry({"v": True, "seq": 2, "prev": b64e(verifier.head.digest), "at": T0, "kind": "open",
                               "host": "h", "key": "k", "log": "L" * 16}, key)  # fmt: skip
    with pytest.raises(UsageLogError, match="wrong version"):
        ChainVerifier(dataclasses.replace(verifier.head)).add(true_version)
