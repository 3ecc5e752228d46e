"""Stateless challenge nonces: a key service issues them without writing anything, and only a release
that spends one writes (the spent nonce, in the release's own transaction).

A nonce is 32 bytes, as the release protocol wants (it goes into the binding the evidence carries)::

    random (8) | expires_at (4, big-endian Unix time) | issued tag (10) | bound tag (10)

``issued tag`` = HMAC-SHA256(K, "issued" ‖ random ‖ expires_at)[:10] says this service made it (and when
it expires); ``bound tag`` = HMAC-SHA256(K, "bound" ‖ random ‖ expires_at ‖ host ‖ key id)[:10] says for
which host key and data key. Two tags let a release tell a forged nonce (``nonce_unknown``) from one issued
to another host or for another key (``nonce_mismatch``). 80-bit tags: a forger needs about 2^80 online
tries. K is derived (HKDF) from the lease-signing key, which every replica and worker of one key service
already shares, so any of them can check a nonce any other issued, and none needs a new secret.
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DOMAIN = b"modelseal/1 challenge nonce"
TAG = 10


class ChallengeTokens:
    def __init__(self, signer: ed25519.Ed25519PrivateKey) -> None:
        self._key = HKDF(hashes.SHA256(), 32, salt=None, info=DOMAIN).derive(signer.private_bytes_raw())

    def _tag(self, label: bytes, *parts: bytes) -> bytes:
        data = label + b"".join(struct.pack(">H", len(p)) + p for p in parts)
        return hmac.new(self._key, data, "sha256").digest()[:TAG]

    def issue(self, host: str, key_id: str, expires_at: int) -> bytes:
        head = os.urandom(8) + struct.pack(">I", expires_at)
        return head + self._tag(b"issued", head) + self._tag(b"bound", head, host.encode(), key_id.encode())

    def issued(self, nonce: bytes) -> int | None:
        """The nonce's expiry time if this service issued it, else None."""
        if len(nonce) != 32 or not hmac.compare_digest(nonce[12:22], self._tag(b"issued", nonce[:12])):
            return None
        return int(struct.unpack(">I", nonce[8:12])[0])

    def bound(self, nonce: bytes, host: str, key_id: str) -> bool:
        """Whether the (issued) nonce was issued to ``host`` for ``key_id``."""
        return hmac.compare_digest(nonce[22:32], self._tag(b"bound", nonce[:12], host.encode(), key_id.encode()))
