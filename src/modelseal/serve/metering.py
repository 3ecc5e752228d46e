"""Metering in ``modelseal serve``: each request is admitted against its model's licence, counted once it
is answered, and the counts go to the host agent (:mod:`modelseal.release.meter` is the contract).

Only a server whose identity is an agent meters, and only models sealed to keys the agent released: a
plaintext model has no licence. Where the requests of a model are counted:

- **One place.** :meth:`Metering.admit` runs in ``ModelManager.infer`` after the request is validated
  and before it runs, for every transport (V2 REST and gRPC, TF Serving REST and gRPC) and with or
  without dynamic batching; :meth:`Metering.done` counts ``requests=1, items=rows`` only for a request
  answered. A request that fails validation or whose run fails is not counted and takes no quota.
- **Per grant, not per key.** Each sealed version of a model has its own key, all under one grant, and
  the agent states each grant's usage. Requests are charged to one key per grant (the smallest id the
  agent holds for it), so a client switching versions draws on the same local counts and the same rate
  buckets instead of a fresh set per version.
- **In-flight requests are reserved.** A request admitted but not yet answered counts against the quota
  of the next one, so concurrent requests (a dynamic batch forming) cannot all pass a limit one of them
  reaches.
- **Counts that arrive during a report's round trip wait here** and go to the meter when it ends, so
  :meth:`~modelseal.release.meter.Meter.sync` sends one report per interval even under load (it sends
  another report for whatever was counted during the last one: under steady load that was a report,
  and an fsync on the agent, per round trip, without end). Admission sees them meanwhile.

The agent must answer: a sealed model is synced before it is reported ready, and a load whose sync fails
fails (:class:`MeteringError`, retried like a dropped key), so no model serves unmetered. Afterwards a
failed periodic sync keeps the counts and tries again; the last licences stated stay in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from modelseal.errors import KeyReleaseError, ModelsealError
from modelseal.release.meter import Licence, LimitExceeded, Meter
from modelseal.release.terms import LIMIT_OF, METRICS, Usage
from modelseal.serve.errors import ServeError, unavailable

if TYPE_CHECKING:
    from modelseal.serve.metrics import Metrics

log = logging.getLogger("modelseal.serve")
SYNC_TIMEOUT_S = 10.0  # one report's round trip to the agent
WARN_EVERY_S = 60.0  # a failing sync is logged at most this often (and once more when it recovers)

Charge = tuple[str, Usage]  # (the key a request is charged to, what it adds)


class MeteringError(ModelsealError):
    """The agent did not take a usage report or state the licences: sealed models are not served unmetered."""


def too_many(message: str, retry_after: float) -> ServeError:
    """A refusal by a licence limit: 429 / RESOURCE_EXHAUSTED, retry after whole seconds (at least 1)."""
    exc = ServeError(429, message)
    exc.retry_after = max(1, math.ceil(retry_after))
    return exc


def rate_client(identity: str, peer: str | None) -> str:
    """Who a rate limit counts: the client certificate's key (``identity``, as the audit log names it),
    else the peer's address without its port (aiohttp's ``request.remote``, gRPC's ``ipv4:ADDR:PORT``),
    so that without mTLS one client's burst does not use up every other client's rate."""
    if identity != "anonymous" or not peer:
        return identity
    if peer.startswith(("ipv4:", "ipv6:")):
        peer = peer.rsplit(":", 1)[0].split(":", 1)[1]
    return f"address {peer}"


def _minus(a: Usage, b: Usage) -> Usage:
    return Usage(*(getattr(a, m) - getattr(b, m) for m in METRICS))


class Metering:
    """The metering of one server's models through the agent at ``socket`` (see the module docstring).

    Used from the server's event loop: admission and counting are plain dictionary work there; only the
    agent's round trip (:meth:`sync`) runs on a thread."""

    def __init__(self, socket: str, metrics: Metrics, sync_s: float = 1.0, meter: Meter | None = None) -> None:
        self.meter = meter or Meter(socket)
        self.metrics, self.sync_s = metrics, sync_s
        self._charged: dict[str, str] = {}  # key id -> the key id of its grant that requests are charged to
        self._limited: set[str] = set()  # charged key ids whose licence sets a limit (the others: count only)
        self._metered: set[str] = set()  # charged key ids whose licence is metered
        self._charged_for: dict[str, Licence] | None = None  # the meter's licences that mapping was made from
        self._inflight: dict[str, Usage] = {}  # admitted, not yet answered
        self._unsent: dict[str, Usage] = {}  # answered during a sync, not yet handed to the meter
        self._syncing = 0  # syncs under way
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._failures = 0
        self._warned = 0.0
        self._handed = self._delivered = 0  # counts handed to the meter; the last of them a sync delivered

    # --- requests -----------------------------------------------------------------------------------

    def charged_key(self, keys: set[str]) -> str | None:
        """The key requests to a model wrapped to ``keys`` are charged to; None if the agent states no
        licence for any of them."""
        licences = self.meter.licences
        if self._charged_for is not licences:  # a new answer from the agent: one grant, one key
            # a grant keeps the key it is charged to while the agent states it: requests in flight and
            # counts not yet handed over are held under that key
            first = {licences[k].grant_id: k for k in set(self._charged.values()) if k in licences}
            for key_id in sorted(licences):
                first.setdefault(licences[key_id].grant_id, key_id)
            self._charged = {key_id: first[lic.grant_id] for key_id, lic in licences.items()}
            self._limited = {key_id for key_id in first.values() if licences[key_id].terms.limited}
            self._metered = {key_id for key_id in first.values() if licences[key_id].terms.metered}
            self._charged_for = licences
        for key_id in sorted(keys):
            if key_id in self._charged:
                return self._charged[key_id]
        return None

    def admit(self, model: str, keys: set[str], client: str, rows: int) -> Charge | None:
        """Admit a request of ``rows`` rows from ``client`` to ``model`` (wrapped to ``keys``), or refuse it:
        429 naming the limit, 503 if the agent no longer states its licence (the key was dropped: the key
        watcher unloads the model). None: a model not metered (not sealed). Pair with :meth:`done`."""
        if not keys:
            return None
        key_id = self.charged_key(keys)
        if key_id is None:
            raise unavailable(f"model {model} is not ready: the agent no longer holds a licence for its key")
        if key_id in self._metered and not self.meter.metering:  # the key service refuses such agents too
            raise unavailable(f"model {model} is licensed metered, but the agent keeps no usage log (usage_log)")
        adding = Usage(requests=1, items=rows)
        running = self._inflight.get(key_id)
        if key_id in self._limited:
            unsent = self._unsent.get(key_id)
            checked = adding + running if running else adding  # (sums only where needed: this is per request)
            try:
                self.meter.admit(key_id, client, checked + unsent if unsent else checked)
            except LimitExceeded as exc:
                self.metrics.licence_refusals.labels(model, exc.kind).inc()
                raise too_many(str(exc), exc.retry_after) from None
        self._inflight[key_id] = running + adding if running else adding
        return key_id, adding

    def done(self, charge: Charge, answered: bool) -> None:
        """The request admitted as ``charge`` ended; it is counted if it was ``answered``."""
        key_id, usage = charge
        running = self._inflight.pop(key_id)
        if running != usage:  # others still running
            self._inflight[key_id] = _minus(running, usage)
        if not answered:
            return
        if self._syncing:
            self._unsent[key_id] = self._unsent.get(key_id, Usage()) + usage
        else:
            self.meter.record(key_id, usage)
            self._handed += 1

    def used(self, keys: set[str]) -> Usage | None:
        """This period's usage of the licence of a model wrapped to ``keys``, as this server knows it."""
        key_id = self.charged_key(keys)
        if key_id is None:
            return None
        known = self.meter.used(key_id)
        return None if known is None else known + self._unsent.get(key_id, Usage())

    # --- the agent ----------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Hand the counts to the meter and report them to the agent, taking its licences back;
        :class:`MeteringError` if it cannot (the meter keeps the counts for the next try)."""
        self._hand_over()
        handed = self._handed
        self._syncing += 1
        try:
            await asyncio.to_thread(self.meter.sync, SYNC_TIMEOUT_S)
        except KeyReleaseError as exc:
            raise MeteringError(f"the agent at {self.meter.socket} did not take the usage report: {exc}") from None
        finally:
            self._syncing -= 1
            if not self._syncing:
                self._hand_over()
        self._delivered = max(self._delivered, handed)

    def _hand_over(self) -> None:
        for key_id, usage in self._unsent.items():
            self.meter.record(key_id, usage)
            self._handed += 1
        self._unsent = {}

    def start(self, loaded: Callable[[], dict[str, set[str]]]) -> None:
        """Sync every ``sync_s`` while any loaded model (``loaded()``: name -> key ids) is metered."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(loaded), name="usage sync")

    async def close(self) -> None:
        """Stop syncing, then report what is left (after the server drained its requests)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self._unsent and self._delivered == self._handed:
            return  # nothing counted since the last report
        try:
            await self.sync()
        except MeteringError as exc:
            log.error("usage counts not reported at shutdown (this host's log misses them): %s", exc)

    async def _run(self, loaded: Callable[[], dict[str, set[str]]]) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            models = {name: keys for name, keys in loaded().items() if keys}
            if not models and not self._unsent:
                continue
            try:
                await self.sync()
            except MeteringError as exc:
                self._failed(exc)
                continue
            if self._failing_since is not None:
                log.warning("usage reports reach the agent again (%d failed sync(s) over %.0f s)",
                            self._failures, time.monotonic() - self._failing_since)  # fmt: skip
                self._failing_since, self._failures = None, 0
            self._gauges(models)

    def _failed(self, exc: MeteringError) -> None:
        now = time.monotonic()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = now
        if self._failures == 1 or now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning("%s (failed %d time(s); the counts are kept and sent again)", exc, self._failures)

    def _gauges(self, models: dict[str, set[str]]) -> None:
        for name, keys in models.items():
            key_id = self.charged_key(keys)
            licence = self.meter.licences.get(key_id) if key_id else None
            used = self.used(keys)
            if licence is None or used is None:
                continue
            for limit, metric in LIMIT_OF.items():
                self.metrics.licence_used.labels(name, metric).set(used.get(metric))
                cap = getattr(licence.terms, limit)
                if cap is not None:
                    self.metrics.licence_limit.labels(name, metric).set(cap)
