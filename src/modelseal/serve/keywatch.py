"""Key revocation: models whose key the host agent dropped are unloaded, and retried until re-granted.

A sealed model's key comes from the host agent. When the agent drops it (the owner revoked the grant,
or the lease ran out during an outage), the model must stop serving: every ``key_check_s`` the watcher
asks the agent which keys it holds, unloads each model wrapped to a key it no longer holds (naming the
agent's reason), and every ``retry_s`` tries again to load the models it unloaded, so that a re-grant
brings them back without a restart. It speaks the agent's wire protocol (:mod:`modelseal.release.wire`),
never the agent's code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from modelseal.errors import ModelsealError
from modelseal.release.identity import AgentIdentity
from modelseal.release.wire import ask

log = logging.getLogger("modelseal.serve")


def agent_socket(identity: object) -> str | None:
    """The socket of the host agent that ``identity`` gets its keys from; None for any other identity."""
    return identity.socket if isinstance(identity, AgentIdentity) else None


class WatchedModels(Protocol):
    """What the watcher needs of the model manager."""

    def key_ids(self) -> dict[str, set[str]]:
        """Loaded models and the key ids each is wrapped to."""

    async def unload(self, name: str, reason: str, retry: bool = False) -> None: ...

    async def retry_dropped(self) -> None:
        """Try again to load every model unloaded because its key went away."""


async def watch(models: WatchedModels, socket: str, key_check_s: float, retry_s: float) -> None:
    """Run until cancelled (see the module docstring); an agent that cannot be asked is logged and asked
    again next time: its silence revokes nothing (the agent itself drops keys whose lease ran out)."""
    last_retry = 0.0
    while True:
        await asyncio.sleep(key_check_s)
        try:
            status, _ = await asyncio.to_thread(ask, socket, {"op": "status"})
        except ModelsealError as exc:
            log.warning("cannot ask the agent for key status: %s", exc)
            continue
        held = {k["key_id"] for k in status.get("keys", [])}
        dropped = status.get("dropped", {})
        for name, keys in models.key_ids().items():
            lost = keys - held
            if lost:
                key_id = sorted(lost)[0]
                why = dropped.get(key_id, {})
                reason = f"key {key_id} was dropped by the agent: {why.get('code', 'not held')}"
                if why.get("message"):
                    reason += f" ({why['message']})"
                await models.unload(name, reason, retry=True)
        if time.monotonic() - last_retry >= retry_s:
            last_retry = time.monotonic()
            await models.retry_dropped()
