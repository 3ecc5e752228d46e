"""A global budget for request bytes in flight, shared by HTTP and gRPC, so that a hostile client cannot
exhaust the server's memory. (Request JSON is read by :func:`modelseal.jsonlimits.loads_bounded`.)

Why a byte budget and not only a per-request size cap: 32 concurrent requests under the 64 MiB cap held
3 GB and starved every other client. The budget charges each request its declared size *before* its body
is read (HTTP ``Content-Length``; gRPC's message size, already received by the C core) and refuses what
does not fit with HTTP 429 / gRPC ``RESOURCE_EXHAUSTED``, so the server's memory for request bodies stays
below the budget however many clients send at once.
"""

from __future__ import annotations

from modelseal.serve.errors import ServeError


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
