"""Limits that keep a hostile client from exhausting the server: a global budget for request bytes in
flight (shared by HTTP and gRPC) and a JSON nesting check that runs before ``json.loads``.

Why a byte budget and not only a per-request size cap: 32 concurrent requests under the 64 MiB cap held
3 GB and starved every other client. The budget charges each request its declared size *before* its body
is read (HTTP ``Content-Length``; gRPC's message size, already received by the C core) and refuses what
does not fit with HTTP 429 / gRPC ``RESOURCE_EXHAUSTED``, so the server's memory for request bodies stays
below the budget however many clients send at once.

Why the depth check scans bytes instead of catching ``RecursionError``: the standard library's decoder
recurses per nesting level, so deep input costs stack and time before it fails, and a ``RecursionError``
is not an input error. The scan sums brackets outside strings with numpy, a megabyte at a time: no Python
recursion, no Python-level loop per byte or per string, memory independent of the body's size.
"""

from __future__ import annotations

import numpy as np

from modelseal.serve.errors import ServeError

_STEP = np.zeros(256, np.int8)  # +1 opens an array/object, -1 closes one
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_QUOTE = ord('"')
_CHUNK = 1 << 20  # bounds the scan's working memory whatever the body's size


def json_depth(text: bytes) -> int:
    """The deepest nesting of arrays/objects in ``text`` (an upper bound when the JSON is malformed).

    Escape pairs are dropped first (``\\\\`` then ``\\"``), so every quote left delimits a string; brackets
    count only where an even number of quotes precede them. Chunked, so memory stays ~10 MiB."""
    cleaned = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = deepest = 0
    in_string = 0
    for start in range(0, len(cleaned), _CHUNK):
        chunk = np.frombuffer(cleaned, np.uint8, count=min(_CHUNK, len(cleaned) - start), offset=start)
        quotes = chunk == _QUOTE
        inside = (np.cumsum(quotes, dtype=np.uint8) + in_string) & 1  # uint8 wraps: parity survives
        step = _STEP[chunk]
        step[inside.astype(bool)] = 0
        moves = step[step != 0]
        if moves.size:
            levels = np.cumsum(moves, dtype=np.int64) + depth
            deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        in_string = (in_string + int(np.count_nonzero(quotes))) & 1
    return deepest


def check_json_depth(text: bytes, limit: int, what: str = "the request") -> None:
    depth = json_depth(text)
    if depth > limit:
        raise ServeError(400, f"{what} nests JSON {depth} levels deep; the limit is {limit}")


class ByteBudget:
    """Bytes of requests in flight across both transports. Used from the one event loop both servers run
    on, so plain integers suffice; every :meth:`take` is paired with a :meth:`release` in a ``finally``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        """Charge ``n`` bytes, or refuse with 429 (RESOURCE_EXHAUSTED) when they do not fit now."""
        if self.used + n > self.limit:
            raise ServeError(
                429,
                f"server busy: {self.used} bytes of requests are in flight and this one needs {n} more "
                f"(budget {self.limit} bytes, --max-inflight-mb); retry later",
            )
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
