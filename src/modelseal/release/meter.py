"""The server side of licences: count what was served, report it to the host agent, enforce the terms.

A :class:`Meter` belongs to one serving process (``modelseal serve``, a vLLM engine, ...). It admits or
refuses each request against the licence of the key its model was opened with (:meth:`Meter.admit`),
counts what was served (:meth:`Meter.record`) and, every second or so, sends the counts to the agent
(:meth:`Meter.sync`, the agent socket's ``usage`` operation), which appends them to its signed usage log
and answers each licence's terms and this period's usage. Reports carry the meter's ``source`` id and
a report number: a report resent after a lost answer is counted once. Counts not yet acknowledged stay
in the meter and go with the next report.

Agent socket ``usage`` operation (:mod:`modelseal.release.wire` framing)::

    {"op": "usage", "source": "s_...", "seq": 7,
     "counts": [{"key_id": "k_...", "requests": 3, "items": 24, "input_tokens": 0, "output_tokens": 0}]}
    -> {"ok": true, "metering": true,
        "licences": [{"key_id": "k_...", "model": "m", "grant_id": "g_...", "terms": {...},
                      "period_start": 1764633600, "used": {"requests": 40, ...}}]}

``counts`` may be empty (a read of the licences). ``used`` is the grant's usage this period as the key
service last stated it plus what this host has logged since. The limits are checked before a request
runs, with what is known: several servers on one host each see the others' usage at their next sync,
and several hosts at their renewals; the key service re-checks the totals at every renewal.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from modelseal.encoding import b64e
from modelseal.errors import FormatError, KeyReleaseError, ModelsealError
from modelseal.release.terms import Terms, Usage
from modelseal.release.wire import ask

MAX_COUNTS_PER_REPORT = 24  # keeps one report inside the agent's 4 KiB request limit
ONE_REQUEST = Usage(requests=1, items=1)
MAX_CLIENTS = 10_000  # rate buckets kept per key (least recently used forgotten first)


class LimitExceeded(ModelsealError):  # noqa: N818  (a decision)
    """A request past a licence limit: ``kind`` is ``quota`` or ``rate``; ``retry_after`` in seconds."""

    def __init__(self, kind: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


@dataclass
class Licence:
    key_id: str
    model: str
    grant_id: str
    terms: Terms
    period_start: int
    used: Usage  # as the agent last answered

    @classmethod
    def from_json(cls, data: Any) -> Licence:
        if not isinstance(data, dict):
            raise FormatError("a licence must be an object")
        fields = ("key_id", "model", "grant_id")
        if not all(isinstance(data.get(name), str) for name in fields):
            raise FormatError("a licence names its key_id, model and grant_id")
        start = data.get("period_start")
        if not isinstance(start, int) or isinstance(start, bool):
            raise FormatError("a licence's period_start must be an integer")
        terms, used = Terms.from_json(data.get("terms")), Usage.from_json(data.get("used"))
        return cls(data["key_id"], data["model"], data["grant_id"], terms, start, used)


class _Bucket:
    """A token bucket of ``rate`` requests per second, holding at most ``max(1, rate)``."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate, self.capacity = rate, max(1.0, rate)
        self.tokens, self.stamp = self.capacity, now

    def take(self, now: float) -> float:
        """0 if a request may go now, else the seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Meter:
    """Counts, reports and limits, for the keys a serving process uses (see the module docstring).

    Thread-safe: requests are admitted and recorded from any thread; :meth:`sync` blocks on the agent's
    socket and is meant for a worker thread (or ``asyncio.to_thread``)."""

    def __init__(self, socket: str, source: str | None = None, clock: Any = time.time) -> None:
        self.socket = socket
        self.source = source or f"s_{b64e(os.urandom(12))}"
        self.clock = clock
        self.licences: dict[str, Licence] = {}
        self.metering = False  # the agent keeps a usage log
        self.refused: dict[str, str] = {}  # key id -> why the agent refused its counts at the last sync
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._pending: dict[str, Usage] = {}  # counted, not yet in a report
        self._inflight: tuple[int, dict[str, Usage]] | None = None  # sent, not yet acknowledged
        self._seq = 0
        self._buckets: dict[str, OrderedDict[str, _Bucket]] = {}

    # --- requests ----------------------------------------------------------------------------------

    def admit(self, key_id: str, client: str, adding: Usage = ONE_REQUEST) -> None:
        """Raise :class:`LimitExceeded` if serving ``adding`` for ``client`` under ``key_id``'s licence would
        pass a limit; a key with no licence (not from the agent) is not limited."""
        with self._lock:
            licence = self.licences.get(key_id)
            if licence is None:
                return
            now = self.clock()
            terms = licence.terms
            if terms.rate is not None:  # per grant: the versions of a model share their licence's buckets
                buckets = self._buckets.setdefault(licence.grant_id, OrderedDict())
                bucket = buckets.pop(client, None) or _Bucket(terms.rate, now)
                buckets[client] = bucket
                while len(buckets) > MAX_CLIENTS:
                    buckets.popitem(last=False)
                wait = bucket.take(now)
                if wait:
                    raise LimitExceeded(
                        "rate", f"rate limit of {terms.rate:g} requests per second per client reached for model "
                        f"{licence.model} (grant {licence.grant_id}); retry in {wait:.2f} s", wait,
                    )  # fmt: skip
            problem = terms.exceeded(self._used(licence, now), adding)
            if problem:
                start = terms.period_start(now)
                raise LimitExceeded(
                    "quota", f"quota exceeded for model {licence.model} (grant {licence.grant_id}): {problem}; "
                    f"the period resets at {start + terms.period_s} (Unix time)", start + terms.period_s - now,
                )  # fmt: skip

    def record(self, key_id: str, usage: Usage) -> None:
        """Count ``usage`` (served) under ``key_id``; it reaches the agent with the next :meth:`sync`."""
        if not usage:
            return
        with self._lock:
            self._pending[key_id] = self._pending.get(key_id, Usage()) + usage

    def used(self, key_id: str) -> Usage | None:
        """This period's usage of ``key_id``'s licence as this process knows it (None: no licence)."""
        with self._lock:
            licence = self.licences.get(key_id)
            return None if licence is None else self._used(licence, self.clock())

    def _used(self, licence: Licence, now: float) -> Usage:
        """The agent's figure for the grant plus what this process counted and the agent has not answered,
        over every key of the grant (each version of a model has its own key, one licence)."""
        current = licence.terms.period_start(now)
        base = licence.used if licence.period_start == current else Usage()
        keys = [k for k, lic in self.licences.items() if lic.grant_id == licence.grant_id]
        inflight = self._inflight[1] if self._inflight is not None else {}
        for key_id in keys:
            base = base + self._pending.get(key_id, Usage()) + inflight.get(key_id, Usage())
        return base  # unacknowledged counts are charged to the current period

    # --- the agent ---------------------------------------------------------------------------------

    def sync(self, timeout: float = 10) -> None:
        """Send what is counted (a report the agent may not have answered first, unchanged), then take the
        agent's licences. Raises :class:`KeyReleaseError` if the agent cannot be asked or refuses; the
        counts then stay here for the next call."""
        with self._sync_lock:
            truncated = True
            while truncated:  # more keys than one report holds: send the rest now; new counts wait
                with self._lock:
                    truncated = self._inflight is not None  # a resend first: then what was counted since
                    if self._inflight is None and self._pending:
                        self._seq += 1
                        batch = dict(list(self._pending.items())[:MAX_COUNTS_PER_REPORT])
                        for key_id in batch:
                            del self._pending[key_id]
                        truncated = bool(self._pending)
                        self._inflight = (self._seq, batch)
                    seq, batch = self._inflight if self._inflight is not None else (self._seq, {})
                counts = [{"key_id": k, **u.to_json()} for k, u in batch.items()]
                try:
                    answer, _ = ask(self.socket, {"op": "usage", "source": self.source, "seq": seq,
                                                  "counts": counts}, timeout=timeout)  # fmt: skip
                except KeyReleaseError as exc:
                    if exc.code == "bad_request" and batch:  # refused for good: resending it would block the rest
                        with self._lock:
                            self._inflight = None
                            self.refused.update(dict.fromkeys(batch, "bad_request"))
                    raise
                licences = _licences(answer)
                refused: dict[str, Any] = answer.get("refused") or {}
                if not isinstance(refused, dict):
                    refused = {}
                with self._lock:
                    self._inflight = None
                    for key_id, why in refused.items():
                        if key_id in batch and isinstance(why, dict) and why.get("code") == "unknown_key":
                            # not (or no longer) known to the agent: kept, and sent again once it is
                            self._pending[key_id] = self._pending.get(key_id, Usage()) + batch[key_id]
                    self.refused = {k: str(v.get("code")) for k, v in refused.items() if isinstance(v, dict)}
                    self.licences = licences
                    self.metering = bool(answer.get("metering"))


def _licences(answer: dict[str, Any]) -> dict[str, Licence]:
    try:
        items = answer.get("licences", [])
        if not isinstance(items, list):
            raise FormatError("licences must be a list")
        return {lic.key_id: lic for lic in map(Licence.from_json, items)}
    except FormatError as exc:
        raise KeyReleaseError("agent_unavailable", f"the agent sent malformed licences: {exc}") from None
