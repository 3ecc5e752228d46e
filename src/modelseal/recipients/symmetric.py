"""A raw 256-bit symmetric key file as recipient and identity (for pipelines that already hold one).

The data key is wrapped with AES-256-GCM under a key-encryption key derived by HKDF from the file's
key and a random salt; an 8-byte key id (also HKDF-derived, so it reveals nothing) names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelseal.encoding import b64d, b64e
from modelseal.errors import AuthenticationError, KeyFileError
from modelseal.keyfile import key_lines, read_text, shown_value, write_secret
from modelseal.recipients.base import Stanza

if TYPE_CHECKING:
    from modelseal.recipients.registry import Registry

LABEL = "MODELSEAL-SYMMETRIC-KEY"
_ZERO_NONCE = bytes(12)  # each wrap uses a fresh salt, hence a fresh KEK: a fixed nonce is safe


def _hkdf(key: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


class SymmetricKey:
    """Both recipient and identity: whoever holds the key file can seal and open."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise KeyFileError("a symmetric key must be exactly 32 bytes")
        self._key = bytes(key)
        self.kid = b64e(_hkdf(self._key, None, b"modelseal/1 symmetric-kid")[:8])

    @classmethod
    def generate(cls) -> SymmetricKey:
        return cls(os.urandom(32))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SymmetricKey:
        """Load a key file: a ``MODELSEAL-SYMMETRIC-KEY:`` line, or exactly 32 raw bytes."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {shown_value(path)}: {exc.strerror}") from None
        if len(raw) == 32 and not raw.startswith(LABEL.encode()[:8]):
            return cls(raw)
        for label, value in key_lines(read_text(path), str(path)):
            if label == LABEL:
                return cls(value)
        raise KeyFileError(f"{shown_value(path)} holds no {LABEL} line and is not a 32-byte raw key")

    def save(self, path: str | os.PathLike[str], force: bool = False) -> None:
        write_secret(path, LABEL, self._key, [f"modelseal symmetric key (kid {self.kid})"], force)

    def describe(self) -> str:
        return f"symmetric key (kid {self.kid})"

    def matches(self, stanza: Stanza) -> bool:
        return stanza.get("type") == "symmetric" and stanza.get("kid") == self.kid

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        salt = os.urandom(16)
        kek = _hkdf(self._key, salt, b"modelseal/1 symmetric-wrap")
        ct = AESGCM(kek).encrypt(_ZERO_NONCE, bytes(dek), context)
        return {"type": "symmetric", "kid": self.kid, "salt": b64e(salt), "ct": b64e(ct)}

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        if stanza.get("type") != "symmetric" or stanza.get("kid") != self.kid:
            return None
        salt = b64d(stanza.get("salt"), what="symmetric stanza salt", length=16)
        ct = b64d(stanza.get("ct"), what="symmetric stanza", length=48)
        kek = _hkdf(self._key, salt, b"modelseal/1 symmetric-wrap")
        try:
            return bytearray(AESGCM(kek).decrypt(_ZERO_NONCE, ct, context))
        except InvalidTag:
            raise AuthenticationError(
                "the symmetric data-key stanza for this key does not decrypt: the header was tampered with"
            ) from None


def register(registry: Registry) -> None:
    """``symmetric:PATH`` seals to a key file; the key file (text, or 32 raw bytes) opens."""
    registry.scheme("symmetric", SymmetricKey.load)
    registry.label(LABEL, SymmetricKey, raw_size=32)
