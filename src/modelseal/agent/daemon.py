"""The agent process: key cache, lease renewal, revocation, outage grace, and the local socket.

A key is fetched on first request (or at start with ``prefetch``), then renewed at the lease's
``renew_after``. A refusal at renewal (revoked, expired, policy) drops the key at once. When the key
service cannot be reached, the key stays usable until ``expires_at + grace`` (the grace the owner put
in the lease, capped by the agent's own ``max_grace_s``), then is dropped. Dropped keys are zeroed.

Before a key is fetched, the agent checks that it belongs to the model the loader named: the key
service lists the key ids (and their models) granted to this host, so asking for another model's key
spends no licence release. The socket is bounded (connections per uid and in all, with a reserve for
root and the admin user; a deadline for each request; small flat requests) so that no local user can
starve the others, and repeated log lines are rate-limited (:mod:`modelseal.agent.lograte`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.agent import lograte
from modelseal.agent.listener import Limits, Listener
from modelseal.agent.release import ReleaseClient
from modelseal.agent.usagelog import Counted, UsageLog, UsageLogFullError
from modelseal.crypto.keys import wipe
from modelseal.errors import FormatError, KeyReleaseError, ModelsealError, ServiceError
from modelseal.memory.locked import LockedKey, harden_process
from modelseal.release.protocol import Lease
from modelseal.release.terms import Terms, Usage
from modelseal.release.wire import FrameError, decode_request, key_request, too_large, usage_request

log = logging.getLogger("modelseal.agent")
MAX_DROPPED = 64  # refusals remembered for `agent status` (oldest forgotten first)
UNLISTED_FETCHES = 4  # concurrent fetches of key ids the key service does not list for this host
BACKLOG_RENEW_S = 1.0  # while the usage log holds more than releases carried: renew this often (64 entries each)
FD_MARGIN = 64  # descriptors beyond the connection cap: listener, key service, logs, TPM tools


@dataclass
class HeldKey:
    secret: LockedKey
    lease: Lease
    renewal: asyncio.Task[None] | None = None


@dataclass
class Acl:
    """Which local uids may get which model's key: ``{"model": [uid, ...], "*": [...]}``; root always may."""

    rules: dict[str, list[int]] = field(default_factory=lambda: {"*": [os.getuid()]})

    def allows(self, uid: int, model: str) -> bool:
        return uid == 0 or uid in self.rules.get(model, self.rules.get("*", []))


class Agent:
    def __init__(
        self,
        client: ReleaseClient,
        acl: Acl,
        max_grace_s: int | None = None,
        retry_s: float = 5,
        limits: Limits | None = None,
        usage_log: UsageLog | None = None,
    ) -> None:
        self.client, self.acl, self.max_grace_s, self.retry_s = client, acl, max_grace_s, retry_s
        self.usage_log = usage_log
        self.licensed: dict[str, Lease] = {}  # key id -> its latest lease, kept after a drop: late counts still count
        self._reporting = asyncio.Lock()  # one release at a time carries the usage log's backlog
        self.limits = limits or Limits()
        self.privileged = self.limits.privileged()
        self.keys: dict[str, HeldKey] = {}
        self.dropped: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.models: dict[str, str] = {}  # key id -> model, as the key service states it (never changes)
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._listed_at = -1.0
        self._list_lock = asyncio.Lock()
        self._unlisted = asyncio.Semaphore(UNLISTED_FETCHES)

    # --- key cache -------------------------------------------------------------------------------

    def _deadline(self, lease: Lease) -> float:
        grace = lease.grace_s if self.max_grace_s is None else min(lease.grace_s, self.max_grace_s)
        return lease.expires_at + grace

    @contextlib.asynccontextmanager
    async def _exclusive(self, key_id: str) -> AsyncIterator[None]:
        """One fetch or renewal of ``key_id`` at a time; the lock is forgotten when nobody holds or awaits it
        (a lock kept per key id ever asked for would let a caller grow the agent's memory without bound)."""
        lock, users = self._locks.setdefault(key_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key_id]

    async def get(self, key_id: str, model: str) -> LockedKey:
        """The key for ``key_id`` (fetching it if needed); :class:`KeyReleaseError` if refused."""
        async with self._exclusive(key_id):
            held = self.keys.get(key_id)
            if held is not None and time.time() >= self._deadline(held.lease):
                self.drop(key_id, "expired", "the lease expired and the key service could not renew it in time")
                held = None
            if held is None:
                owner = await self._model_of(key_id)
                _check_model(key_id, owner, model)
                if owner is not None:
                    held = await self._fetch(key_id, model)
                else:  # not granted to this host (the service will say why), or granted a moment ago
                    async with self._unlisted:
                        held = await self._fetch(key_id, model)
            _check_model(key_id, held.lease.model, model)
            return held.secret

    async def _model_of(self, key_id: str) -> str | None:
        """The model ``key_id`` belongs to, from the key service's list of keys granted to this host.

        When the list lacks ``key_id`` it is read again before anything is fetched, so that a grant made
        a moment ago is checked against the requested model here, not by spending a release. One read
        answers every request that was waiting for it; an id still unlisted is then forwarded (at most
        a few at a time), which costs the key service a request anyway."""
        if key_id in self.models:
            return self.models[key_id]
        asked = time.monotonic()
        async with self._list_lock:
            if key_id not in self.models and self._listed_at < asked:  # no list read since this request came
                self._listed_at = time.monotonic()
                try:
                    granted = await self.client.granted_keys()
                except ModelsealError as exc:
                    log.warning("cannot list the keys granted to this host: %s", exc)
                else:
                    self.models.update((item["key_id"], item["model"]) for item in granted)
        return self.models.get(key_id)

    async def _release(self, key_id: str) -> tuple[Lease, bytearray]:
        """One exchange with the key service for ``key_id``, carrying the usage log's report if there is one."""
        if self.usage_log is None:
            return await self.client.fetch(key_id)
        async with self._reporting:
            lease, dek = await self.client.fetch(key_id, self.usage_log)
        self.licensed[key_id] = lease
        return lease, dek

    async def _fetch(self, key_id: str, model: str) -> HeldKey:
        try:
            lease, dek = await self._release(key_id)
        except ServiceError as exc:
            self._remember(key_id, exc.code, str(exc))
            raise KeyReleaseError(exc.code, str(exc)) from None
        self.models[key_id] = lease.model
        self.licensed[key_id] = lease
        if lease.model != model:  # only if a grant appeared after the list was read: never cache it
            wipe(dek)
            log.warning("key %s was released for model %s, not %s: wiped, not cached", key_id, lease.model, model)
            _check_model(key_id, lease.model, model)
        held = HeldKey(LockedKey(dek), lease)
        self.keys[key_id] = held
        self.dropped.pop(key_id, None)
        held.renewal = asyncio.get_running_loop().create_task(self._renew(key_id), name=f"renew {key_id}")
        log.info(
            "key %s for model %s fetched; lease %s until %d", key_id, lease.model, lease.lease_id, lease.expires_at
        )
        return held

    def _remember(self, key_id: str, code: str, message: str) -> None:
        """Record why ``key_id`` is not held, for `agent status`; the oldest of :data:`MAX_DROPPED` go first."""
        self.dropped[key_id] = (code, message[:300])
        self.dropped.move_to_end(key_id)
        while len(self.dropped) > MAX_DROPPED:
            self.dropped.popitem(last=False)

    def drop(self, key_id: str, code: str, message: str) -> None:
        held = self.keys.pop(key_id, None)
        if held is None:
            return
        held.secret.wipe()
        if held.renewal is not None and held.renewal is not asyncio.current_task():
            held.renewal.cancel()
        self._remember(key_id, code, message)
        log.warning("key %s for model %s dropped: %s (%s)", key_id, held.lease.model, code, message)

    async def _renew(self, key_id: str) -> None:
        while (held := self.keys.get(key_id)) is not None:
            wait = held.lease.renew_after - time.time()
            if self.usage_log is not None and self.usage_log.backlog():
                wait = min(wait, BACKLOG_RENEW_S)  # a release carries a bounded report: send the rest soon
            await asyncio.sleep(max(0.0, wait))
            async with self._exclusive(key_id):
                held = self.keys.get(key_id)
                if held is None:
                    return
                try:
                    lease, dek = await self._release(key_id)
                except ServiceError as exc:
                    if exc.status == 0 or exc.status >= 500:
                        self._outage(key_id, held, str(exc))
                    else:
                        self.drop(key_id, exc.code, str(exc))
                        return
                except KeyReleaseError as exc:  # a bad answer: possibly an attacker; treat as an outage
                    self._outage(key_id, held, str(exc))
                else:
                    if lease.model != held.lease.model:  # the service signed a lease for another model
                        wipe(dek)
                        self._outage(key_id, held, f"the renewal named model {lease.model}")
                    else:
                        old, held.secret, held.lease = held.secret, LockedKey(dek), lease
                        old.wipe()
                        log.info("key %s renewed; lease %s until %d", key_id, lease.lease_id, lease.expires_at)
                        continue
            if key_id in self.keys:
                await asyncio.sleep(self.retry_s)

    def _outage(self, key_id: str, held: HeldKey, why: str) -> None:
        if time.time() >= self._deadline(held.lease):
            self.drop(
                key_id, "keyserver_unreachable", f"the key service stayed unreachable past the grace period: {why}"
            )
        else:
            log.warning(
                "renewal of %s failed (%s); serving from cache until %d", key_id, why, self._deadline(held.lease)
            )
            held.lease = dataclasses.replace(held.lease, renew_after=int(time.time()))

    async def prefetch(self) -> None:
        """Fetch every key this host is granted (errors are logged; loads retry on demand)."""
        try:
            granted = await self.client.granted_keys()
        except ModelsealError as exc:
            log.warning("prefetch failed: %s", exc)
            return
        self.models.update((item["key_id"], item["model"]) for item in granted)
        for item in granted:
            try:
                await self.get(item["key_id"], item["model"])
            except ModelsealError as exc:
                log.warning("prefetch of %s failed: %s", item["key_id"], exc)

    def status(self) -> dict[str, Any]:
        keys = [
            {"key_id": k, "model": h.lease.model, "expires_at": h.lease.expires_at, "locked_in_ram": h.secret.locked}
            for k, h in self.keys.items()
        ]
        return {"keys": keys, "dropped": {k: {"code": c, "message": m} for k, (c, m) in self.dropped.items()}}

    def status_for(self, uid: int) -> dict[str, Any]:
        """:meth:`status` as ``uid`` may see it: all of it for the agent's user, root and the admin user; for
        another user only the keys of models the ACL lets it use (a server watching its own models, as
        ``modelseal serve`` does under its own uid), which it could ask for anyway."""
        full = self.status()
        if uid in self.privileged:
            return full

        def mine(model: str | None) -> bool:
            return model is not None and self.acl.allows(uid, model)

        return {
            "keys": [k for k in full["keys"] if mine(k["model"])],
            "dropped": {k: v for k, v in full["dropped"].items() if mine(self.models.get(k))},
        }

    def close(self) -> None:
        for key_id in list(self.keys):
            self.drop(key_id, "shutdown", "the agent is shutting down")

    # --- local socket ------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int, uid: int) -> None:
        """One exchange on a connection the :class:`Listener` admitted for local process ``pid`` of ``uid``."""
        header, payload = await self._exchange(reader, pid, uid)
        await self._send(writer, header, payload)

    async def _exchange(self, reader: asyncio.StreamReader, pid: int, uid: int) -> tuple[dict[str, Any], Any]:
        """The answer (header and, for a key, the key's bytes) to one request on the socket."""
        try:
            request = await self._read(reader)
            if request.get("op") == "status":
                return {"ok": True, **self.status_for(uid)}, None
            if request.get("op") == "usage":
                return await self._usage(request, uid), None
            if request.get("op") != "key":
                raise FrameError("bad_request", "expected op 'key' with key_id and model, 'status' or 'usage'")
            key_id, model = key_request(request)
        except FrameError as exc:
            log.info("pid %d uid %d: request refused: %s (%s)", pid, uid, exc.code, exc)
            return _refusal(exc.code, str(exc)), None
        if not self.acl.allows(uid, model):
            log.warning("pid %d uid %d refused key for model %s (not in the agent's ACL)", pid, uid, model)
            return _refusal("forbidden", f"uid {uid} may not use model {model}"), None
        try:
            secret = await self.get(key_id, model)
        except KeyReleaseError as exc:
            log.info("pid %d uid %d: key %s for %s refused: %s", pid, uid, key_id, model, exc.code)
            return _refusal(exc.code, str(exc)), None
        log.info("pid %d uid %d: key %s for model %s handed out", pid, uid, key_id, model)
        return {"ok": True, "key_bytes": 32, "model": model}, secret.view()

    async def _usage(self, request: dict[str, Any], uid: int) -> dict[str, Any]:
        """Log a server's counts (each for a key whose model ``uid`` may use) and answer the licences of the
        keys it may use: their terms and this period's usage (spec: :mod:`modelseal.release.meter`)."""
        source, report, counts = usage_request(request)
        counted, refused = [], {}
        for key_id, usage in counts:  # a key refused here leaves the others' counts to be logged
            lease = self.licensed.get(key_id)
            grant, model = (lease.grant_id, lease.model) if lease is not None else self._logged_key(key_id)
            if not grant:
                refused[key_id] = {"code": "unknown_key", "message": f"key {key_id} was never released to this agent"}
            elif not self.acl.allows(uid, model):
                refused[key_id] = {"code": "forbidden", "message": f"uid {uid} may not use model {model}"}
            else:
                counted.append(Counted(key_id, grant, model, usage))
        if self.usage_log is not None and counted:
            try:
                await asyncio.to_thread(self.usage_log.record, f"{uid}.{source}", report, counted)
            except UsageLogFullError as exc:
                raise FrameError("bad_request", str(exc)) from None
            except OSError as exc:  # not logged: the server keeps the counts and sends them again
                log.error("cannot write the usage log: %s", exc)
                why = exc.strerror or str(exc)
                raise FrameError("usage_log_failed", f"the agent cannot write its usage log: {why}") from None
        licences = [self._licence(k, h.lease) for k, h in self.keys.items() if self.acl.allows(uid, h.lease.model)]
        answer: dict[str, Any] = {"ok": True, "metering": self.usage_log is not None, "licences": licences}
        if refused:
            answer["refused"] = refused
        return answer

    def _logged_key(self, key_id: str) -> tuple[str, str]:
        """(grant, model) of a key the usage log has counted before (this agent may not hold it since a
        restart); empty strings if none."""
        if self.usage_log is None:
            return "", ""
        return self.usage_log.licensed.get(key_id, ("", ""))

    def _licence(self, key_id: str, lease: Lease) -> dict[str, Any]:
        """A held key's terms and its grant's usage this period: the key service's figure in the lease (all
        hosts, up to what that release reported) plus what this host logged since."""
        terms = Terms.from_json(lease.terms)
        now = time.time()
        start = terms.period_start(now)
        used = Usage()
        if lease.usage.get("period_start") == start:
            try:
                used = Usage.from_json(lease.usage.get("used", {}))
            except FormatError:  # the lease is signed, but a count past 2**53 is not one a server can use
                log.warning("lease %s states usage the agent cannot read; counting this host's alone", lease.lease_id)
        if self.usage_log is not None:
            used = used + self.usage_log.used(lease.grant_id, start, int(lease.usage.get("seq", 0)))
        return {
            "key_id": key_id, "model": lease.model, "grant_id": lease.grant_id, "terms": lease.terms,
            "period_start": start, "used": used.capped().to_json(),
        }  # fmt: skip

    async def _read(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        """One request line, within the request deadline and the size limit."""
        timeout = self.limits.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            raise FrameError(
                "timeout", f"no complete request within {timeout:g} s; the agent closed the connection"
            ) from None
        except asyncio.LimitOverrunError:
            raise too_large() from None
        except asyncio.IncompleteReadError:
            raise FrameError("bad_request", "the connection ended before a complete request line") from None
        return decode_request(line)

    async def _send(self, writer: asyncio.StreamWriter, header: dict[str, Any], payload: Any = None) -> None:
        """Write the answer and close; a client that does not read it within the deadline is cut off."""
        try:
            writer.write(json.dumps(header).encode() + b"\n")
            if payload is not None:
                writer.write(payload)
            async with asyncio.timeout(self.limits.request_timeout_s):
                await writer.drain()
        except (OSError, TimeoutError):
            writer.transport.abort()
        finally:
            writer.close()

    async def serve(self, path: str, mode: int = 0o600, prefetch: bool = True) -> None:
        """Serve on the unix socket at ``path`` until cancelled."""
        listener = Listener(Path(path), mode, self.limits, self.handle)
        listener.open()
        lim = self.limits
        log.info(
            "agent listening on %s (mode %o), key service %s; at most %d connections (%d per uid, %d reserved for "
            "root and the admin user), %g s per request",
            path, mode, self.client.url, lim.max_connections, lim.max_connections_per_uid,
            lim.reserved_connections, lim.request_timeout_s,
        )  # fmt: skip
        try:
            if prefetch:
                await self.prefetch()
            await asyncio.Event().wait()  # until cancelled
        finally:
            await listener.close()
            self.close()
            await self.client.close()
            if self.usage_log is not None:
                self.usage_log.close()


def _check_model(key_id: str, owner: str | None, model: str) -> None:
    if owner is not None and owner != model:
        raise KeyReleaseError("model_mismatch", f"key {key_id} belongs to model {owner}, not {model}")


def _refusal(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


def raise_fd_limit(limits: Limits) -> Limits:
    """Raise RLIMIT_NOFILE to cover the connection cap (or shrink the cap to what the hard limit allows).

    With the cap below the descriptor limit a flood is refused connection by connection instead of
    exhausting descriptors, which would stop the agent accepting anyone (root included)."""
    need = limits.max_connections + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        cap = max(2, soft - FD_MARGIN)
        log.warning(
            "RLIMIT_NOFILE allows %d descriptors: max_connections lowered from %d to %d (raise LimitNOFILE)",
            soft, limits.max_connections, cap,
        )  # fmt: skip
        reserved = min(limits.reserved_connections, cap - 1)
        limits = dataclasses.replace(limits, max_connections=cap, reserved_connections=reserved)
    return limits


def run(client: ReleaseClient, socket_path: str, acl: Acl, **options: Any) -> None:
    """Harden the process and run the agent until SIGINT/SIGTERM."""
    harden_process()
    limiter = lograte.install()
    limits = raise_fd_limit(options.pop("limits", None) or Limits())
    agent = Agent(
        client, acl, options.pop("max_grace_s", None), options.pop("retry_s", 5), limits, options.pop("usage_log", None)
    )

    async def flush_counts() -> None:
        while True:
            await asyncio.sleep(limiter.window_s)
            limiter.flush()

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        flusher = loop.create_task(flush_counts())
        try:
            await agent.serve(socket_path, **options)
        except asyncio.CancelledError:
            log.info("agent stopped; keys wiped")
        finally:
            flusher.cancel()

    try:
        asyncio.run(main())
    finally:
        lograte.uninstall(limiter)
