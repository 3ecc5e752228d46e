"""The append-only, hash-chained audit log of every decision the key service makes.

Entry ``n`` stores the canonical JSON of the event and ``hash_n = SHA-256(hash_{n-1} ‖ seq ‖ ts ‖ json)``
(hex; ``hash_0`` is 64 zeros). Changing, inserting or deleting any entry breaks every later hash;
:func:`verify_entries` finds the first broken link. Dropping the newest entries is only detectable
against an exported head (``seq`` and ``hash``), so operators should export regularly
(docs/operations.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from modelseal.errors import FormatError
from modelseal.jsonlimits import loads_bounded
from modelseal.keyserver.store import AuditEntry

GENESIS = "0" * 64


def _link(prev_hash: str, seq: int, ts_ms: int, entry: str) -> str:
    h = hashlib.sha256()
    h.update(bytes.fromhex(prev_hash))
    h.update(f"{seq}\n{ts_ms}\n".encode())
    h.update(entry.encode())
    return h.hexdigest()


def next_entry(head: tuple[int, str], event: dict[str, Any]) -> AuditEntry:
    """The entry that chains ``event`` after ``head`` (``(seq, hash)``, locked by the caller's transaction)."""
    seq, prev = head[0] + 1, head[1]
    ts_ms = int(time.time() * 1000)
    entry = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
    return AuditEntry(seq, ts_ms, entry, prev, _link(prev, seq, ts_ms, entry))


@dataclass
class ChainReport:
    ok: bool
    count: int
    head_seq: int
    head_hash: str
    problem: str = ""


def verify_entries(rows: Iterable[dict[str, Any]], expected_head: tuple[int, str] | None = None) -> ChainReport:
    """Check every link; with ``expected_head`` (e.g. from an earlier export), also detect a cut tail."""
    prev, seq, count = GENESIS, 0, 0
    seen_at_expected = None
    for row in rows:
        count += 1
        if not _well_formed(row):  # a tampered database or export: a broken chain, not a crash
            why = f"entry {seq + 1} is malformed (a field is missing or mistyped)"
            return ChainReport(False, count, seq, prev, why)
        if int(row["seq"]) != seq + 1:
            return ChainReport(False, count, seq, prev, f"entry {seq + 1} is missing (found {row['seq']} next)")
        if row["prev_hash"] != prev:
            return ChainReport(False, count, seq, prev, f"entry {row['seq']} does not link to entry {seq}")
        if _link(prev, int(row["seq"]), int(row["ts_ms"]), row["entry"]) != row["hash"]:
            return ChainReport(False, count, seq, prev, f"entry {row['seq']} was modified (hash mismatch)")
        seq, prev = int(row["seq"]), row["hash"]
        if expected_head is not None and seq == expected_head[0]:
            seen_at_expected = prev
    if expected_head is not None:
        want_seq, want_hash = expected_head
        if seq < want_seq:
            return ChainReport(False, count, seq, prev, f"the log ends at entry {seq}, but entry {want_seq} existed")
        if want_seq > 0 and seen_at_expected != want_hash:
            return ChainReport(False, count, seq, prev, f"entry {want_seq} differs from the exported head")
    return ChainReport(True, count, seq, prev)


def against_recorded_head(report: ChainReport, recorded: tuple[int, str] | None) -> ChainReport:
    """``report`` of a store's entries, also checked against the head the store recorded with its last
    append: entries deleted from the end (or all of them) leave a chain that links, but not to that head."""
    if not report.ok:
        return report
    if recorded is None:
        return ChainReport(False, report.count, report.head_seq, report.head_hash, "the store has no audit head record")
    if (report.head_seq, report.head_hash) != tuple(recorded):
        why = f"the log ends at entry {report.head_seq}, but the store's head record says entry {recorded[0]}"
        return ChainReport(False, report.count, report.head_seq, report.head_hash, why)
    return report


def _well_formed(row: Any) -> bool:
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return (
        isinstance(row, dict)
        and integer(row.get("seq"))
        and integer(row.get("ts_ms"))
        and all(isinstance(row.get(k), str) for k in ("entry", "prev_hash", "hash"))
    )


def read_jsonl(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = loads_bounded(line, max_bytes=1 << 20, max_depth=4, what=f"line {number}")
                if not isinstance(row, dict):
                    raise FormatError(f"line {number} is not a JSON object")
                yield row
            except FormatError:
                yield {"seq": -number, "ts_ms": 0, "entry": "", "prev_hash": "", "hash": "unparseable line"}
