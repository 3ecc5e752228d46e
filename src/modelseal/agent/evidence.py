"""Evidence the agent can produce for a release, by kind. Each collector gets the exchange's binding
(to put in its report data) and the nonce; ``mtls`` needs nothing beyond the TLS handshake."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Collector = Callable[[bytes, bytes], dict[str, Any]]

_COLLECTORS: dict[str, Collector] = {"mtls": lambda binding, nonce: {"kind": "mtls"}}


def register_collector(kind: str, collector: Collector) -> None:
    _COLLECTORS[kind] = collector


def collect(kinds: list[str], binding: bytes, nonce: bytes) -> list[dict[str, Any]]:
    """Evidence of every requested kind this host can produce (the service refuses what is missing)."""
    return [_COLLECTORS[k](binding, nonce) for k in dict.fromkeys(kinds) if k in _COLLECTORS]
