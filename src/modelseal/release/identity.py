"""``identity="agent:/path/to.sock"``: loaders get ``keyserver`` data keys from the host agent."""

from __future__ import annotations

from modelseal.errors import FormatError, KeyReleaseError
from modelseal.recipients.base import Stanza
from modelseal.recipients.registry import Registry


class AgentIdentity:
    """Asks the host agent at ``socket`` for the data key of a ``keyserver`` stanza."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    @property
    def socket(self) -> str:
        """The agent's socket path: serve watches the same agent for dropped keys."""
        return self.socket_path

    def describe(self) -> str:
        return f"agent at {self.socket_path}"

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        if stanza.get("type") != "keyserver":
            return None
        key_id, model = stanza.get("key_id"), stanza.get("model")
        if not isinstance(key_id, str) or not isinstance(model, str):
            raise FormatError("malformed keyserver stanza: key_id and model must be strings")
        from modelseal.release.wire import ask  # the socket protocol: imported by the first key asked for

        _answer, key = ask(self.socket_path, {"op": "key", "key_id": key_id, "model": model})
        if len(key) != 32:
            raise KeyReleaseError("agent_unavailable", "the agent sent a malformed key")
        return key


def register(registry: Registry) -> None:
    """The ``agent:SOCKET`` identity spec (listed in :data:`modelseal.recipients.registry.BUILTIN`)."""
    registry.spec("agent", AgentIdentity)
