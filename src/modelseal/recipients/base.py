"""The recipient and identity interfaces, and the registry of recipient-string schemes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

Stanza = dict[str, Any]


@runtime_checkable
class Recipient(Protocol):
    """Something a data key can be wrapped to."""

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        """Return a stanza (JSON object with a ``type``) that lets the matching identity recover ``dek``.

        ``context`` binds the stanza to one artifact; unwrapping under another context fails.
        """
        ...

    def describe(self) -> str:
        """A short public description, e.g. ``x25519:AbC...`` (never secret)."""
        ...


@runtime_checkable
class Identity(Protocol):
    """Something that can unwrap some stanzas."""

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        """Return the data key if ``stanza`` is for this identity, None if it is not.

        Raise :class:`~modelseal.errors.AuthenticationError` if it is addressed to this identity but
        fails to decrypt, and :class:`~modelseal.errors.FormatError` if it is malformed.
        """
        ...

    def describe(self) -> str: ...


_SCHEMES: dict[str, Callable[[str], Recipient]] = {}


def register_scheme(prefix: str, factory: Callable[[str], Recipient]) -> None:
    """Teach :func:`parse_recipient` a new ``prefix:...`` recipient string (e.g. ``keyserver``)."""
    _SCHEMES[prefix] = factory


def scheme(prefix: str) -> Callable[[str], Recipient] | None:
    return _SCHEMES.get(prefix)


def known_schemes() -> list[str]:
    return sorted(_SCHEMES)
