"""Public-key recipients through HPKE (RFC 9180) as shipped by ``cryptography``.

Two KEMs: ``x25519`` (DHKEM(X25519, HKDF-SHA256)) and ``mlkem768x25519`` (the ML-KEM-768 + X25519
hybrid), both with HKDF-SHA256 and AES-256-GCM, base mode, single shot. The hybrid KEM keeps the data
key safe against a future quantum computer that records the files today ("harvest now, decrypt
later") as long as either of its two halves holds.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from modelseal.encoding import b64d, b64e
from modelseal.errors import AuthenticationError, FormatError, KeyFileError
from modelseal.keyfile import write_secret
from modelseal.recipients.base import Stanza

if TYPE_CHECKING:
    from modelseal.recipients.registry import Registry


@dataclass(frozen=True)
class _Kem:
    name: str  # recipient-string prefix and stanza type
    label: str  # identity-file line label
    kem: hpke.KEM


X25519 = _Kem("x25519", "MODELSEAL-IDENTITY-X25519", hpke.KEM.X25519)
MLKEM768X25519 = _Kem("mlkem768x25519", "MODELSEAL-IDENTITY-MLKEM768X25519", hpke.KEM.MLKEM768_X25519)
KEMS = {k.name: k for k in (X25519, MLKEM768X25519)}


def _suite(kem: _Kem) -> hpke.Suite:
    return hpke.Suite(kem.kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _kid(public_raw: bytes) -> str:
    """An 8-byte key id so a host can tell at once whether a stanza is for it."""
    return b64e(hashlib.sha256(b"modelseal/1 kid" + public_raw).digest()[:8])


class HpkeRecipient:
    """A host's public key: ``x25519:BASE64`` or ``mlkem768x25519:BASE64``."""

    def __init__(self, kem: _Kem, public_raw: bytes) -> None:
        self.kem = kem
        self.public_raw = public_raw
        try:
            if kem is X25519:
                self._key: object = x25519.X25519PublicKey.from_public_bytes(public_raw)
            else:
                self._key = hpke.MLKEM768X25519PublicKey(
                    mlkem.MLKEM768PublicKey.from_public_bytes(public_raw[:-32]),
                    x25519.X25519PublicKey.from_public_bytes(public_raw[-32:]),
                )
        except ValueError:
            raise KeyFileError(f"malformed {kem.name} public key") from None

    @classmethod
    def parse(cls, kem: _Kem, text: str) -> HpkeRecipient:
        try:
            return cls(kem, b64d(text, what=f"{kem.name} recipient"))
        except FormatError as exc:
            raise KeyFileError(str(exc)) from None

    def describe(self) -> str:
        return f"{self.kem.name}:{b64e(self.public_raw)}"

    def matches(self, stanza: Stanza) -> bool:
        return stanza.get("type") == self.kem.name and stanza.get("kid") == _kid(self.public_raw)

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        blob = _suite(self.kem).encrypt(bytes(dek), self._key, info=context)  # type: ignore[arg-type]
        return {"type": self.kem.name, "kid": _kid(self.public_raw), "ct": b64e(blob)}


class HpkeIdentity:
    """A host's private key for one of the HPKE KEMs."""

    def __init__(self, kem: _Kem, secret: bytes) -> None:
        self.kem = kem
        self._secret = bytes(secret)
        try:
            if kem is X25519:
                self._key: object = x25519.X25519PrivateKey.from_private_bytes(secret)
                public_raw = self._key.public_key().public_bytes_raw()  # type: ignore[attr-defined]
            else:
                mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(secret[:64])
                xk = x25519.X25519PrivateKey.from_private_bytes(secret[64:])
                self._key = hpke.MLKEM768X25519PrivateKey(mk, xk)
                public_raw = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
        except ValueError:
            raise KeyFileError(f"malformed {kem.name} identity") from None
        self.recipient = HpkeRecipient(kem, public_raw)
        self._kid = _kid(public_raw)

    @classmethod
    def generate(cls, kem: _Kem) -> HpkeIdentity:
        if kem is X25519:
            return cls(kem, os.urandom(32))
        return cls(kem, os.urandom(64) + os.urandom(32))

    def save(self, path: str | os.PathLike[str], force: bool = False) -> None:
        write_secret(
            path,
            self.kem.label,
            self._secret,
            [f"modelseal {self.kem.name} identity", f"recipient: {self.recipient.describe()}"],
            force,
        )

    def describe(self) -> str:
        return f"{self.kem.name} identity (kid {self._kid})"

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        if stanza.get("type") != self.kem.name or stanza.get("kid") != self._kid:
            return None
        blob = b64d(stanza.get("ct"), what=f"{self.kem.name} stanza")
        try:
            return bytearray(_suite(self.kem).decrypt(blob, self._key, info=context))  # type: ignore[arg-type]
        except (InvalidTag, ValueError):
            raise AuthenticationError(
                f"the {self.kem.name} data-key stanza addressed to this identity does not decrypt: "
                "the header was tampered with or copied from another artifact"
            ) from None


def generate_identity(kind: str = "x25519") -> HpkeIdentity:
    """A new host identity: ``x25519`` or ``mlkem768x25519`` (post-quantum hybrid)."""
    if kind not in KEMS:
        raise ValueError(f"identity kind must be one of {', '.join(KEMS)}")
    return HpkeIdentity.generate(KEMS[kind])


def register(registry: Registry) -> None:
    """Per KEM: its public key as a recipient string (``x25519:B64``) and its identity-file label."""
    for kem in KEMS.values():
        registry.scheme(kem.name, partial(HpkeRecipient.parse, kem), public_key=True)
        registry.label(kem.label, partial(HpkeIdentity, kem))
