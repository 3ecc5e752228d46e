"""The recipient and identity interfaces: all the format knows about who can unwrap a data key.

The strings and key files that name recipients and identities are mapped to them in
:mod:`modelseal.recipients.registry`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from modelseal.errors import KeyReleaseError, NoMatchingIdentityError

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
class MatchingRecipient(Recipient, Protocol):
    """A recipient that recognises its own stanzas in a header without any secret.

    Optional: rekey needs it to find the stanzas a removed recipient wrote and to skip adding a
    recipient that is already there. Recipients whose stanzas name no public key (``keyserver``) omit it.
    """

    def matches(self, stanza: Stanza) -> bool:
        """Whether ``stanza`` was written by this recipient (same type and key id)."""
        ...


@runtime_checkable
class Identity(Protocol):
    """Something that can unwrap some stanzas."""

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        """Return the data key if ``stanza`` is for this identity, None if it is not.

        "Not mine, and here is why" (a wrong passphrase, an agent that is down or refuses) is raised as
        one of :data:`NOT_MINE`: the caller records the reason and lets the next identity or stanza
        try, as age does with its incorrect-identity error. Raise
        :class:`~modelseal.errors.AuthenticationError` if the stanza is addressed to this identity but
        fails to decrypt, and :class:`~modelseal.errors.FormatError` if it is malformed; both stop
        the unwrap.
        """
        ...

    def describe(self) -> str: ...


NOT_MINE: tuple[type[Exception], ...] = (NoMatchingIdentityError, KeyReleaseError)
"""Errors an identity raises to say "this stanza is not mine" with a reason worth reporting."""


class IdentitySet:
    """Several identities presented as one; the format tries each member on each stanza in turn."""

    def __init__(self, members: list[Identity]) -> None:
        self.members = members

    def describe(self) -> str:
        return ", ".join(i.describe() for i in self.members)

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        """The first member's key for ``stanza``; a member's "not mine" lets the next one try."""
        refusals: list[Exception] = []
        for identity in self.members:
            try:
                dek = identity.unwrap(stanza, context)
            except NOT_MINE as exc:
                refusals.append(exc)
                continue
            if dek is not None:
                return dek
        if refusals:
            raise refusals[0]
        return None


def members(identity: Identity) -> list[Identity]:
    """The identities to try one by one: the members of a set, or ``identity`` itself."""
    return list(identity.members) if isinstance(identity, IdentitySet) else [identity]
