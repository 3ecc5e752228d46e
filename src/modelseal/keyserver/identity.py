"""What a grant names, as a type: one key hash, one URI, or every URI under a prefix.

The three never mix. A ``spki:`` grant is compared with the hash of the certificate's public key and
nothing else, so a URI SAN spelled ``spki:<hash>`` cannot stand in for a key (and no such URI is
accepted anywhere: :func:`modelseal.pki.identity_uri`). A URI grant is compared with the certificate's
URI SANs, both in canonical form; a ``/*`` grant matches URIs one or more whole segments below its
prefix, and since canonical URIs hold no dot, empty or percent-encoded segments, "below" in the text is
below in fact (``spiffe://td/prod/*`` never matches ``spiffe://td/prod/../host/a``: no certificate or
grant can carry that URI).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, UsageError
from modelseal.pki import SPKI_PREFIX, PeerIdentity, identity_uri

log = logging.getLogger("modelseal.keyserver")
PREFIX_SUFFIX = "/*"
_warned: set[str] = set()


@dataclass(frozen=True)
class GrantIdentity:
    kind: Literal["spki", "uri", "prefix"]
    value: str  # canonical: "spki:B64", the URI, or the prefix without "/*"
    spki_hash: bytes = b""

    @property
    def text(self) -> str:
        """The canonical text stored in the grant."""
        return self.value + PREFIX_SUFFIX if self.kind == "prefix" else self.value

    def matches(self, peer: PeerIdentity) -> bool:
        """Whether ``peer`` is the host this grant names (never, for a certificate with a refused URI)."""
        if peer.refused_uris:
            return False
        if self.kind == "spki":
            return hmac.compare_digest(self.spki_hash, peer.spki_hash)
        if self.kind == "uri":
            return self.value in peer.uris
        below = self.value + "/"
        return any(uri.startswith(below) for uri in peer.uris)


def naming(peer: PeerIdentity) -> list[str]:
    """Every grant identity text that could name ``peer``: its key hash, its URIs, and each URI's ancestor
    prefixes with ``/*``. A store looks grants up by these (an index, not a scan of every grant); the
    service still checks each one it gets with :func:`identity_matches`."""
    if peer.refused_uris:
        return []
    names = [peer.spki, *peer.uris]
    for uri in peer.uris:
        start = uri.find("://") + 3 if "://" in uri else uri.find(":") + 1
        cut = uri.find("/", start)
        while cut != -1:
            names.append(uri[:cut] + PREFIX_SUFFIX)
            cut = uri.find("/", cut + 1)
    return sorted(set(names))


@lru_cache(maxsize=4096)
def parse_grant_identity(text: str) -> GrantIdentity:
    """Parse what a grant names; :class:`UsageError` says why ``text`` names no host."""
    if text[: len(SPKI_PREFIX)].lower() == SPKI_PREFIX:
        try:
            digest = b64d(text[len(SPKI_PREFIX) :], what="the key hash after spki:", length=32)
        except FormatError as exc:
            raise UsageError(
                f"{exc}: a spki: identity is the SHA-256 of a certificate's public key, as "
                "`modelseal pki identity CERT` prints it"
            ) from None
        return GrantIdentity("spki", SPKI_PREFIX + b64e(digest), digest)
    if text.endswith(PREFIX_SUFFIX):
        return GrantIdentity("prefix", identity_uri(text[: -len(PREFIX_SUFFIX)]))
    return GrantIdentity("uri", identity_uri(text))


def identity_matches(pattern: str, peer: PeerIdentity) -> bool:
    """Whether a stored grant identity names ``peer``; a grant that no longer parses names nobody."""
    try:
        return parse_grant_identity(pattern).matches(peer)
    except UsageError as exc:
        if pattern not in _warned:  # once per grant identity: this runs for every request
            _warned.add(pattern)
            log.warning("a grant names an identity that matches no host (%s)", exc)
        return False
