"""Licence terms and usage counts, shared by the key service (which sets and re-checks them), the agent
(which keeps the signed usage log) and the servers that enforce them (``modelseal serve``, loaders).

A grant's terms travel in the signed lease, so a host learns them only from the key service. Limits are
per *period*: fixed windows of ``period_s`` seconds aligned to the Unix epoch (``86400``: UTC days), the
same windows on every host and at the key service, so "today's usage" means one thing everywhere.
``max_tokens`` counts input and output tokens together. ``rate`` is requests per second per client
identity (a token bucket of ``max(1, rate)`` requests), enforced by the server only: usage reports are
totals and cannot show bursts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from modelseal.errors import FormatError

METRICS = ("requests", "items", "input_tokens", "output_tokens")
MAX_COUNT = 2**53  # counts travel in JSON: beyond this a double loses integers
PERIODS = {"hour": 3600, "day": 86400, "week": 604800}
LIMIT_OF = {"max_requests": "requests", "max_items": "items", "max_tokens": "tokens"}
LICENCE_MAX = 128


def _count(what: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_COUNT:
        raise FormatError(f"{what} must be a whole number from 0 to 2**53")
    return value


@dataclass(frozen=True)
class Usage:
    """Counts of served work: requests answered, inference items (batch rows), LLM tokens."""

    requests: int = 0
    items: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:  # written out: it runs for every request a server admits
        return Usage(
            self.requests + other.requests, self.items + other.items,
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
        )  # fmt: skip

    def capped(self) -> Usage:
        """Each count at most 2**53 - 1 (a sum over many hosts may pass what a count may hold)."""
        return Usage(*(min(getattr(self, m), MAX_COUNT - 1) for m in METRICS))

    def get(self, metric: str) -> int:
        """A count by name; ``tokens`` is input and output together."""
        return self.tokens if metric == "tokens" else int(getattr(self, metric))

    def __bool__(self) -> bool:
        return any(getattr(self, m) for m in METRICS)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, what: str = "usage") -> Usage:
        """Strict: an object of exactly the known counts (missing ones are 0), each a whole number."""
        if not isinstance(data, dict):
            raise FormatError(f"{what} must be an object of counts")
        unknown = set(data) - set(METRICS)
        if unknown:
            raise FormatError(f"{what} has unknown count {sorted(unknown)[0]!r} (known: {', '.join(METRICS)})")
        return cls(**{m: _count(f"{what}.{m}", data.get(m, 0)) for m in METRICS})


@dataclass(frozen=True)
class Terms:
    """What a grant allows per period. The defaults are an unmetered grant with no limits."""

    metered: bool = False
    period_s: int = 86400
    max_requests: int | None = None
    max_items: int | None = None
    max_tokens: int | None = None
    rate: float | None = None  # requests per second per client identity
    report_grace_s: int = 3600  # how long a metered host may renew without a fresh usage report
    licence: str | None = None  # the owner's licence id (the one a fingerprinted copy carries)

    def __post_init__(self) -> None:
        if any(getattr(self, limit) is not None for limit in LIMIT_OF) and not self.metered:
            object.__setattr__(self, "metered", True)  # a quota needs counts: limits imply metering

    @property
    def limited(self) -> bool:
        return any(getattr(self, limit) is not None for limit in LIMIT_OF) or self.rate is not None

    def period_start(self, t: float) -> int:
        """The start of the period holding Unix time ``t``."""
        return int(t) - int(t) % self.period_s

    def exceeded(self, used: Usage, adding: Usage = Usage()) -> str | None:
        """Which limit ``used + adding`` goes past, as a message naming it; None if within every limit."""
        total = used + adding
        for limit, metric in LIMIT_OF.items():
            cap = getattr(self, limit)
            if cap is not None and total.get(metric) > cap:
                return f"{limit} {cap} per {_period_text(self.period_s)} reached ({metric} used: {used.get(metric)})"
        return None

    def to_json(self) -> dict[str, Any]:
        """Only what differs from the defaults, so an unmetered grant's lease carries ``{}``."""
        default = Terms()
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value != getattr(default, name)}

    @classmethod
    def from_json(cls, data: Any, what: str = "terms") -> Terms:
        """Strict: unknown keys, wrong types and out-of-range values are a :class:`FormatError` naming them."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise FormatError(f"{what} must be an object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise FormatError(f"{what} has unknown term {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        if "metered" in data:
            if not isinstance(data["metered"], bool):
                raise FormatError(f"{what}.metered must be true or false")
            values["metered"] = data["metered"]
        for name, low in (("period_s", 10), ("report_grace_s", 0)):
            if name in data:
                value = _count(f"{what}.{name}", data[name])
                if value < low or value > 366 * 86400:
                    raise FormatError(f"{what}.{name} must be from {low} to {366 * 86400} seconds")
                values[name] = value
        for name in LIMIT_OF:
            if data.get(name) is not None:
                values[name] = _count(f"{what}.{name}", data[name])
        if data.get("rate") is not None:
            rate = data["rate"]
            number = isinstance(rate, int | float) and not isinstance(rate, bool)
            if not number or (isinstance(rate, float) and not math.isfinite(rate)) or not 0 < rate <= 1e6:
                raise FormatError(f"{what}.rate must be a number of requests per second above 0 (at most 1e6)")
            values["rate"] = float(rate)
        if data.get("licence") is not None:
            licence = data["licence"]
            if not isinstance(licence, str) or not 0 < len(licence) <= LICENCE_MAX or not licence.isprintable():
                raise FormatError(f"{what}.licence must be 1 to {LICENCE_MAX} printable characters")
            values["licence"] = licence
        return cls(**values)


def period_seconds(text: str) -> int:
    """``hour``, ``day``, ``week`` or a number of seconds (at least 10)."""
    if text in PERIODS:
        return PERIODS[text]
    try:
        value = int(text)
    except ValueError:
        raise FormatError(f"period {text!r} is not hour, day, week or a number of seconds") from None
    if not 10 <= value <= 366 * 86400:
        raise FormatError("a period is 10 seconds to 366 days")
    return value


def _period_text(seconds: int) -> str:
    names = {v: k for k, v in PERIODS.items()}
    return names.get(seconds, f"{seconds} s period")
