"""The agent's local protocol over a unix stream socket, one exchange per connection.

Request: one JSON line, ``{"op": "key", "key_id": ..., "model": ...}`` or ``{"op": "status"}``, at most
:data:`MAX_REQUEST` bytes and :data:`MAX_DEPTH` levels of nesting.
Answer: one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "code": ..., "message": ...}``; a key
answer says ``"key_bytes": 32`` and the raw key follows the newline, so neither side ever turns the
key into an immutable (unwipeable) Python string. Every refusal, including a request the agent will not
read (too large, too deep, too slow, too many connections), gets such an error line before the agent
closes the connection: a client never waits on silence.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

from modelseal.crypto.keys import wipe
from modelseal.errors import FormatError, KeyReleaseError, ModelsealError
from modelseal.jsonlimits import JSONLimitError, loads_bounded
from modelseal.release.protocol import MODEL_NAME
from modelseal.release.terms import Usage

MAX_MESSAGE = 64 * 1024  # the largest answer a client reads (status lists every held and dropped key)
MAX_REQUEST = 4 * 1024  # a request is one small flat object; anything larger is refused unread
MAX_DEPTH = 4  # requests are flat objects; deeper nesting is refused before it is parsed

# what the key service issues: ids are short base64url tokens, model names match its MODEL_NAME rule;
# both are checked before anything is logged or sent on, so no control character reaches a log line
KEY_ID = re.compile(r"[A-Za-z0-9_=-]{1,64}")


class FrameError(ModelsealError):
    """A request the agent refuses to parse; ``code`` and the message go back in an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def too_large() -> FrameError:
    return FrameError("too_large", f"a request is at most {MAX_REQUEST} bytes, one JSON object per line")


def decode_request(line: bytes) -> dict[str, Any]:
    """One request line as a dict, or :class:`FrameError` saying why it is refused.

    Size and depth are checked before parsing (:func:`modelseal.jsonlimits.loads_bounded` scans the
    nesting without recursion), so a frame of 4,000 brackets is an error line, never a RecursionError."""
    if len(line) > MAX_REQUEST:
        raise too_large()
    try:
        request = loads_bounded(line, max_bytes=MAX_REQUEST, max_depth=MAX_DEPTH, what="the request")
    except JSONLimitError as exc:
        raise FrameError(exc.code, str(exc)) from None
    if not isinstance(request, dict):
        raise FrameError("bad_request", "send one JSON object per line")
    return request


def key_request(request: dict[str, Any]) -> tuple[str, str]:
    """``(key_id, model)`` of a key request whose fields have the key service's syntax."""
    key_id, model = request.get("key_id"), request.get("model")
    if not isinstance(key_id, str) or not isinstance(model, str):
        raise FrameError("bad_request", "expected op 'key' with key_id and model")
    if not KEY_ID.fullmatch(key_id):
        raise FrameError("bad_request", "key_id is not a key service key id (1-64 characters of A-Z a-z 0-9 _ - =)")
    if not MODEL_NAME.fullmatch(model):
        raise FrameError("bad_request", f"model is not a model name (must match {MODEL_NAME.pattern})")
    return key_id, model


MAX_COUNTS = 32  # keys in one usage report (release/meter.py sends at most 24)
MAX_REPORTED = 2**40  # one count in one report: far above a second's work, far below 2**53 totals
SOURCE = re.compile(r"[A-Za-z0-9_=-]{1,64}")


def usage_request(request: dict[str, Any]) -> tuple[str, int, list[tuple[str, Usage]]]:
    """``(source, report number, [(key_id, counts)])`` of a ``usage`` request (spec: release/meter.py)."""
    source, seq, counts = request.get("source"), request.get("seq"), request.get("counts", [])
    if not isinstance(source, str) or not SOURCE.fullmatch(source):
        raise FrameError("bad_request", "source must be 1-64 characters of A-Z a-z 0-9 _ - =")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**53:
        raise FrameError("bad_request", "seq must be a whole number (the report's number)")
    if not isinstance(counts, list) or len(counts) > MAX_COUNTS:
        raise FrameError("bad_request", f"counts must be a list of at most {MAX_COUNTS} objects")
    parsed = []
    for item in counts:
        key_id = item.get("key_id") if isinstance(item, dict) else None
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise FrameError("bad_request", "each count names a key_id (1-64 characters of A-Z a-z 0-9 _ - =)")
        try:
            usage = Usage.from_json({k: v for k, v in item.items() if k != "key_id"}, "counts")
        except FormatError as exc:
            raise FrameError("bad_request", str(exc)) from None
        if any(value > MAX_REPORTED for value in usage.to_json().values()):
            raise FrameError("bad_request", f"a count in one report is at most {MAX_REPORTED}")
        parsed.append((key_id, usage))
    if len({key_id for key_id, _ in parsed}) != len(parsed):
        raise FrameError("bad_request", "a usage report names each key once")
    return source, seq, parsed


def error_frame(code: str, message: str) -> bytes:
    return json.dumps({"ok": False, "code": code, "message": message}).encode() + b"\n"


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect within ``timeout``, retrying while the listen queue is full.

    A unix socket with a timeout is non-blocking underneath, and there a full listen queue fails at
    once with EAGAIN; under a connection flood the agent drains its queue in milliseconds, so retry."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.002)


def ask(path: str, request: dict[str, Any], timeout: float = 60) -> tuple[dict[str, Any], bytearray]:
    """Send one request to the agent at ``path``; return (answer, payload) or raise :class:`KeyReleaseError`."""
    buf = bytearray(MAX_MESSAGE)
    filled = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            _connect(sock, path, timeout)
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent refused before reading (busy, too large): its error frame is waiting
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
        answer = loads_bounded(buf[:end], max_bytes=MAX_MESSAGE, max_depth=2 * MAX_DEPTH, what="the answer")
        if not isinstance(answer, dict):
            raise ValueError
        size = int(answer.get("key_bytes", 0))
        if filled != end + 1 + size:
            raise ValueError
        payload = bytearray(buf[end + 1 : filled])
    except (ValueError, JSONLimitError):
        raise KeyReleaseError("agent_unavailable", f"the agent at {path} sent a malformed answer") from None
    finally:
        wipe(buf)
    if not answer.get("ok"):
        raise KeyReleaseError(str(answer.get("code", "refused")), str(answer.get("message", "the agent refused")))
    return answer, payload
