"""The agent's local protocol over a unix stream socket, one exchange per connection.

Request: one JSON line, ``{"op": "key", "key_id": ..., "model": ...}`` or ``{"op": "status"}``.
Answer: one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "code": ..., "message": ...}``; a key
answer says ``"key_bytes": 32`` and the raw key follows the newline, so neither side ever turns the
key into an immutable (unwipeable) Python string.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from modelseal.crypto.keys import wipe
from modelseal.errors import KeyReleaseError

MAX_MESSAGE = 64 * 1024


def ask(path: str, request: dict[str, Any], timeout: float = 60) -> tuple[dict[str, Any], bytearray]:
    """Send one request to the agent at ``path``; return (answer, payload) or raise :class:`KeyReleaseError`."""
    buf = bytearray(MAX_MESSAGE)
    filled = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            view = memoryview(buf)
            while filled < MAX_MESSAGE:
                n = sock.recv_into(view[filled:])
                if n == 0:
                    break
                filled += n
    except OSError as exc:
        raise KeyReleaseError(
            "agent_unavailable",
            f"cannot reach the modelseal agent at {path}: {exc.strerror or exc} (is `modelseal agent run` running?)",
        ) from None
    try:
        end = buf.index(b"\n", 0, filled)
        answer = json.loads(bytes(buf[:end]))
        if not isinstance(answer, dict):
            raise ValueError
        size = int(answer.get("key_bytes", 0))
        if filled != end + 1 + size:
            raise ValueError
        payload = bytearray(buf[end + 1 : filled])
    except ValueError:
        raise KeyReleaseError("agent_unavailable", f"the agent at {path} sent a malformed answer") from None
    finally:
        wipe(buf)
    if not answer.get("ok"):
        raise KeyReleaseError(str(answer.get("code", "refused")), str(answer.get("message", "the agent refused")))
    return answer, payload
