"""The agent process: key cache, lease renewal, revocation, outage grace, and the local socket.

A key is fetched on first request (or at start with ``prefetch``), then renewed at the lease's
``renew_after``. A refusal at renewal (revoked, expired, policy) drops the key at once. When the key
service cannot be reached, the key stays usable until ``expires_at + grace`` (the grace the owner put
in the lease, capped by the agent's own ``max_grace_s``), then is dropped. Dropped keys are zeroed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.agent.memory import LockedKey, harden_process
from modelseal.agent.release import ReleaseClient
from modelseal.agent.wire import MAX_MESSAGE
from modelseal.errors import KeyReleaseError, ModelsealError, ServiceError
from modelseal.keyserver.protocol import Lease

log = logging.getLogger("modelseal.agent")
_PEERCRED = struct.Struct("3i")


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
    def __init__(self, client: ReleaseClient, acl: Acl, max_grace_s: int | None = None, retry_s: float = 5) -> None:
        self.client, self.acl, self.max_grace_s, self.retry_s = client, acl, max_grace_s, retry_s
        self.keys: dict[str, HeldKey] = {}
        self.dropped: dict[str, tuple[str, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # --- key cache -------------------------------------------------------------------------------

    def _deadline(self, lease: Lease) -> float:
        grace = lease.grace_s if self.max_grace_s is None else min(lease.grace_s, self.max_grace_s)
        return lease.expires_at + grace

    async def get(self, key_id: str, model: str) -> LockedKey:
        """The key for ``key_id`` (fetching it if needed); :class:`KeyReleaseError` if refused."""
        async with self._locks.setdefault(key_id, asyncio.Lock()):
            held = self.keys.get(key_id)
            if held is not None and time.time() >= self._deadline(held.lease):
                self.drop(key_id, "expired", "the lease expired and the key service could not renew it in time")
                held = None
            if held is None:
                held = await self._fetch(key_id)
            if held.lease.model != model:
                raise KeyReleaseError(
                    "model_mismatch", f"key {key_id} belongs to model {held.lease.model}, not {model}"
                )
            return held.secret

    async def _fetch(self, key_id: str) -> HeldKey:
        try:
            lease, dek = await self.client.fetch(key_id)
        except ServiceError as exc:
            self.dropped[key_id] = (exc.code, str(exc))
            raise KeyReleaseError(exc.code, str(exc)) from None
        held = HeldKey(LockedKey(dek), lease)
        self.keys[key_id] = held
        self.dropped.pop(key_id, None)
        held.renewal = asyncio.get_running_loop().create_task(self._renew(key_id), name=f"renew {key_id}")
        log.info(
            "key %s for model %s fetched; lease %s until %d", key_id, lease.model, lease.lease_id, lease.expires_at
        )
        return held

    def drop(self, key_id: str, code: str, message: str) -> None:
        held = self.keys.pop(key_id, None)
        if held is None:
            return
        held.secret.wipe()
        if held.renewal is not None and held.renewal is not asyncio.current_task():
            held.renewal.cancel()
        self.dropped[key_id] = (code, message)
        log.warning("key %s for model %s dropped: %s (%s)", key_id, held.lease.model, code, message)

    async def _renew(self, key_id: str) -> None:
        while (held := self.keys.get(key_id)) is not None:
            await asyncio.sleep(max(0.0, held.lease.renew_after - time.time()))
            async with self._locks.setdefault(key_id, asyncio.Lock()):
                held = self.keys.get(key_id)
                if held is None:
                    return
                try:
                    lease, dek = await self.client.fetch(key_id)
                except ServiceError as exc:
                    if exc.status == 0 or exc.status >= 500:
                        self._outage(key_id, held, str(exc))
                    else:
                        self.drop(key_id, exc.code, str(exc))
                        return
                except KeyReleaseError as exc:  # a bad answer: possibly an attacker; treat as an outage
                    self._outage(key_id, held, str(exc))
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

    def close(self) -> None:
        for key_id in list(self.keys):
            self.drop(key_id, "shutdown", "the agent is shutting down")

    # --- local socket ------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        try:
            line = await reader.readuntil(b"\n")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            await _answer(writer, {"ok": False, "code": "bad_request", "message": "send one JSON object per line"})
            return
        op = request.get("op")
        if op == "status":
            if uid not in (0, os.getuid()):
                await _answer(writer, {"ok": False, "code": "forbidden", "message": "status is for the agent's user"})
            else:
                await _answer(writer, {"ok": True, **self.status()})
            return
        key_id, model = request.get("key_id"), request.get("model")
        if op != "key" or not isinstance(key_id, str) or not isinstance(model, str):
            await _answer(
                writer, {"ok": False, "code": "bad_request", "message": "expected op 'key' with key_id and model"}
            )
            return
        if not self.acl.allows(uid, model):
            log.warning("pid %d uid %d refused key for model %s (not in the agent's ACL)", pid, uid, model)
            await _answer(writer, {"ok": False, "code": "forbidden", "message": f"uid {uid} may not use model {model}"})
            return
        try:
            secret = await self.get(key_id, model)
        except KeyReleaseError as exc:
            log.info("pid %d uid %d: key %s for %s refused: %s", pid, uid, key_id, model, exc.code)
            await _answer(writer, {"ok": False, "code": exc.code, "message": str(exc)})
            return
        log.info("pid %d uid %d: key %s for model %s handed out", pid, uid, key_id, model)
        await _answer(writer, {"ok": True, "key_bytes": 32, "model": model}, secret.view())

    async def serve(self, path: str, mode: int = 0o600, prefetch: bool = True) -> None:
        """Serve on the unix socket at ``path`` until cancelled."""
        socket_path = Path(path)
        if socket_path.is_socket():
            socket_path.unlink()
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self.handle, path=path, limit=MAX_MESSAGE)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        log.info("agent listening on %s (mode %o), key service %s", path, mode, self.client.url)
        if prefetch:
            await self.prefetch()
        try:
            async with server:
                await server.serve_forever()
        finally:
            self.close()
            await self.client.close()
            socket_path.unlink(missing_ok=True)


async def _answer(writer: asyncio.StreamWriter, header: dict[str, Any], payload: memoryview | None = None) -> None:
    writer.write(json.dumps(header).encode() + b"\n")
    if payload is not None:
        writer.write(payload)
    try:
        await writer.drain()
    finally:
        writer.close()


def run(client: ReleaseClient, socket_path: str, acl: Acl, **options: Any) -> None:
    """Harden the process and run the agent until SIGINT/SIGTERM."""
    harden_process()
    agent = Agent(client, acl, options.pop("max_grace_s", None), options.pop("retry_s", 5))

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await agent.serve(socket_path, **options)
        except asyncio.CancelledError:
            log.info("agent stopped; keys wiped")

    asyncio.run(main())
