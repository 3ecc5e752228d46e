"""Usage reports at the key service: accept a host's signed log entries, and hold a metered grant to them.

A release may carry the host agent's usage report (:mod:`modelseal.release.usage`): the entries after
the one this service acknowledged in the challenge, and a head statement signed with the release's
nonce. :func:`accept_report` checks it inside the release's transaction, against the head stored for
that host: the chain continues (no entry repeated, skipped, reordered or changed), every entry is signed
by the log key pinned at the host's first report, running totals only grow, times move forward and are
not older than the previous report nor ahead of this service's clock (so usage cannot be moved into a
past period), each grant named is one this host holds for that model, and the head statement is
fresh. Accepted entries are stored (the usage report reads them) and written, as signed, into the audit
chain. Any failure refuses the release: a host whose log does not verify gets no key until the owner
resets its chain (``modelseal keyserver usage reset``).

:func:`check_metered` is what a metered grant asks at every release: a fresh report (or one within the
grant's ``report_grace_s``), and this period's usage over all hosts within its limits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from modelseal.encoding import b64e
from modelseal.keyserver.identity import identity_matches
from modelseal.keyserver.store import GrantRecord, Transaction, UsageHeadRecord, UsageRecord
from modelseal.pki import PeerIdentity
from modelseal.release.terms import Terms, Usage
from modelseal.release.usage import CLOCK_SKEW_S, LOG_ID, MAX_REPORT, ChainVerifier, Head, UsageLogError, digest


class ReportRejected(Exception):  # noqa: N818  (turned into a Refused by the service)
    """Why a usage report is refused (the message names the entry and the check)."""


@dataclass(frozen=True)
class UsageState:
    """The releasing agent's usage log as this release leaves it: ``head`` (None: the release carried no
    report), and how many entries the agent says it still holds back (``pending``)."""

    head: UsageHeadRecord | None
    pending: int = 0


def _head(record: UsageHeadRecord | None) -> Head | None:
    return None if record is None else Head.from_json(asdict(record))


def accept_report(tx: Transaction, peer: PeerIdentity, report: Any, nonce: bytes, t: int) -> UsageState:
    """Check and store ``report`` (None: the release carried none); :class:`ReportRejected` if it fails."""
    if report is None:
        return UsageState(None)
    log = report.get("log") if isinstance(report, dict) else None
    if not isinstance(log, str) or not LOG_ID.fullmatch(log):
        raise ReportRejected("a usage report names its log (16-64 characters of A-Z a-z 0-9 _ -)")
    stored = tx.usage_head(peer.spki, log)
    entries = report.get("entries")
    if not isinstance(entries, list) or len(entries) > MAX_REPORT or not all(isinstance(e, str) for e in entries):
        raise ReportRejected(f"a usage report is an object with at most {MAX_REPORT} entry lines (strings)")
    # what was used since the log's last report happened after it and not after now: the host's dates
    # are kept in the signed entries, the service counts each entry at its date clamped to that window,
    # so neither a slow clock nor a fast one moves usage into another period (and a forward jump of the
    # host's clock refuses nothing). A new chain's first report reaches back at most CLOCK_SKEW_S.
    floor = stored.reported_at if stored is not None else t - CLOCK_SKEW_S
    verifier = ChainVerifier(_head(stored))
    rows: list[UsageRecord] = []
    grants: dict[str, GrantRecord] = {}
    try:
        for line in entries:
            entry = verifier.add(line.encode())
            if entry.kind == "open":
                if entry.body["host"] != peer.spki:
                    raise ReportRejected(f"the usage log was opened by host {entry.body['host']}, not {peer.spki}")
                continue
            grant = grants.get(entry.grant) or tx.grant(entry.grant)
            if grant is None or grant.model != entry.body["model"] or not identity_matches(grant.identity, peer):
                raise ReportRejected(
                    f"usage entry {entry.seq} counts usage for grant {entry.grant} of model {entry.body['model']}, "
                    "which this host does not hold"
                )
            grants[grant.grant_id] = grant
            at = min(max(entry.at, floor), t)
            key_id = entry.body["key_id"]
            if not tx.leased(peer.spki, key_id, grant.grant_id, at, CLOCK_SKEW_S + grant.grace_s):
                raise ReportRejected(
                    f"usage entry {entry.seq} counts usage of key {key_id} under grant {grant.grant_id}, which "
                    "leased it to this host at no time near then"
                )
            entry_hash = b64e(digest(entry.line))
            rows.append(UsageRecord(peer.spki, entry_hash, entry.seq, at, grant.grant_id, grant.model, entry.delta))
        pending = verifier.check_head(report.get("head"), nonce)
    except UsageLogError as exc:
        raise ReportRejected(str(exc)) from None
    head = verifier.head
    if head.log != log:
        raise ReportRejected(f"the usage report names log {log} but its entries are log {head.log}")
    current_at = t if pending == 0 or stored is None else stored.current_at
    record = UsageHeadRecord(**head.to_json(), reported_at=t, current_at=current_at)  # head.host: this peer
    tx.put_usage_head(record)
    if entries:
        counted = tx.add_usage(rows)
        first = head.seq - len(entries) + 1
        tx.append_audit(
            {"event": "usage.report", "host": peer.spki, "log": head.log, "from_seq": first, "to_seq": head.seq,
             "digest": record.digest, "counted": counted, "entries": entries}
        )  # fmt: skip
    return UsageState(record, pending)


def check_metered(grant: GrantRecord, terms: Terms, state: UsageState, used: Usage, t: int) -> str | None:
    """Why a metered grant refuses this release (code ``usage_required``, ``usage_overdue`` or
    ``quota_exceeded`` first, then the message), or None; ``used``: the grant's usage this period.

    Every release of a metered key carries the releasing agent's own report: an agent without a usage log
    never gets one, whatever other agents of the same host report. Its log may hold entries back (a
    release carries at most 64) for ``report_grace_s`` at most."""
    gid = grant.grant_id
    if state.head is None:
        return (
            f"usage_required: grant {gid} is metered: every release needs the agent's usage report (the host "
            "agent needs usage_log in its config)"
        )
    behind = t - state.head.current_at
    if state.pending and behind > terms.report_grace_s:
        return (
            f"usage_overdue: grant {gid} is metered and this host's agent has held back usage entries for {behind} "
            f"s ({state.pending} now; grace {terms.report_grace_s} s)"
        )
    problem = terms.exceeded(used)
    return f"quota_exceeded: grant {gid}: {problem}" if problem else None


def policy_usage(tx: Transaction, grant_id: str, terms: Terms, t: int) -> dict[str, int]:
    """The ``usage`` variable of grant policies: this period's counts, today's (UTC) as ``*_today``, and
    all-time ones as ``*_total``, each also as ``tokens`` (input + output)."""
    variables: dict[str, int] = {}
    for suffix, since in (("", terms.period_start(t)), ("_today", t - t % 86400), ("_total", 0)):
        used = tx.usage_of(grant_id, since)
        for name in ("requests", "items", "input_tokens", "output_tokens", "tokens"):
            variables[name + suffix] = used.get(name)
    return variables
