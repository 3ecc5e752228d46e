"""Refusals are audited, but a flood of them must not fill the disk.

Every refused request used to append (and fsync) one audit entry, so anyone who can open a TCP
connection could grow the database at the speed of the network. Now each (event, code, peer) gets
``burst`` full entries per interval, written at once as before; the refusals past that are only
counted, and at the end of the interval each such count becomes one summary entry (``"summary": true``,
``"count": N``, first and last time, one sample) appended to the same hash chain. The peer is the
certificate's ``spki:`` hash when the host presented one, otherwise the remote address; past
``max_peers`` distinct keys in an interval, new peers share one ``"*"`` key, and at most
``total_burst`` full entries are written per interval over all peers. (Refusals of requests that
carry the admin token are always written in full.) So a flood costs at most
``total_burst + max_peers`` entries per interval whatever its size, and no refusal goes uncounted:
the number of refusals is the number of full refusal entries plus the sum of the summaries' counts.

Counts not yet written are written when the interval ends, before the audit log is read through the
admin API, and when the service shuts down; a crash (SIGKILL, power loss) loses at most one
interval's counts, never a full entry.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

OVERFLOW_PEER = "*"


@dataclass(frozen=True)
class RefusalSettings:
    """``[audit]`` in keyserver.toml."""

    burst: int = 5  # full entries per (event, code, peer) per interval
    interval_s: int = 60  # how often the counts past the burst are written as summaries
    max_peers: int = 256  # distinct (event, code, peer) keys per interval before peers share "*"
    total_burst: int = 200  # full entries per interval over all keys


@dataclass
class _Tally:
    full: int = 0
    counted: int = 0
    first_ms: int = 0
    last_ms: int = 0
    sample: dict[str, Any] = field(default_factory=dict)


def peer_of(event: dict[str, Any]) -> str:
    """Who was refused: the certificate's key hash if the host showed one, else the remote address."""
    return str(event.get("host") or event.get("remote") or "unknown")


class RefusalLimiter:
    """Decides which refusals are written in full and counts the rest (thread-safe, in memory)."""

    def __init__(self, settings: RefusalSettings | None = None) -> None:
        self.settings = settings or RefusalSettings()
        self._lock = threading.Lock()
        self._tallies: dict[tuple[str, str, str], _Tally] = {}
        self._full = 0
        self._unwritten: list[dict[str, Any]] = []  # summaries whose write failed, retried next time

    def admit(self, record: dict[str, Any]) -> bool:
        """True: append ``record`` (a refusal audit event) now. False: it was counted for a summary.

        Refusals of the authenticated admin are always written in full: the admin token is not
        something a flood can have, and each of its refusals explains a change that did not happen."""
        if record.get("actor") == "admin":
            return True
        s = self.settings
        key = (str(record.get("event")), str(record.get("code")), peer_of(record))
        with self._lock:
            tally = self._tallies.get(key)
            if tally is None:
                if len(self._tallies) >= s.max_peers:
                    key = (key[0], key[1], OVERFLOW_PEER)
                tally = self._tallies.setdefault(key, _Tally())
            if tally.full < s.burst and self._full < s.total_burst:
                tally.full += 1
                self._full += 1
                return True
            now_ms = int(time.time() * 1000)
            if not tally.counted:
                tally.first_ms = now_ms
                tally.sample = {k: record[k] for k in ("path", "why") if k in record}
            tally.counted += 1
            tally.last_ms = now_ms
            return False

    def drain(self) -> list[dict[str, Any]]:
        """Summary events for the refusals counted so far; starts a new interval."""
        with self._lock:
            tallies, self._tallies, self._full = self._tallies, {}, 0
            summaries, self._unwritten = self._unwritten, []
        for (event, code, peer), t in tallies.items():
            if t.counted:
                who = {"host": peer} if peer.startswith("spki:") else {"remote": peer}
                summaries.append(
                    {"event": event, "decision": "refused", "code": code, "summary": True, "count": t.counted,
                     "first_ms": t.first_ms, "last_ms": t.last_ms, **who, **t.sample}
                )  # fmt: skip
        return summaries

    def requeue(self, summaries: list[dict[str, Any]]) -> None:
        """Keep summaries whose write failed for the next :meth:`drain` (their counts are not lost)."""
        with self._lock:
            self._unwritten = summaries + self._unwritten
