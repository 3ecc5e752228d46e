"""A passphrase recipient (scrypt), meant for development and hand-offs, not for fleets.

The work factor is stored in the stanza; unwrapping refuses factors above ``MAX_LOG_N`` so a hostile
file cannot make a host spend unbounded memory.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, NoMatchingIdentityError, UsageError
from modelseal.recipients.base import Stanza

if TYPE_CHECKING:
    from modelseal.recipients.registry import Registry

DEFAULT_LOG_N = 17  # 128 MiB, ~0.3 s here
MIN_LOG_N, MAX_LOG_N = 10, 22
_ZERO_NONCE = bytes(12)  # fresh salt per wrap, hence a fresh KEK


def _kek(passphrase: bytes, salt: bytes, log_n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << log_n, r=8, p=1).derive(passphrase)


class Passphrase:
    """Recipient and identity from a passphrase."""

    def __init__(self, passphrase: str | bytes, log_n: int = DEFAULT_LOG_N) -> None:
        if not passphrase:
            raise UsageError("the passphrase is empty")
        if not MIN_LOG_N <= log_n <= MAX_LOG_N:
            raise UsageError(f"scrypt log_n must be between {MIN_LOG_N} and {MAX_LOG_N}")
        self._secret = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        self.log_n = log_n

    @classmethod
    def from_env(cls, var: str, log_n: int = DEFAULT_LOG_N) -> Passphrase:
        value = os.environ.get(var)
        if not value:
            raise UsageError(f"environment variable {var} is not set or empty (it should hold the passphrase)")
        return cls(value, log_n)

    def describe(self) -> str:
        return "passphrase"

    def matches(self, stanza: Stanza) -> bool:
        return stanza.get("type") == "scrypt"

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        salt = os.urandom(16)
        ct = AESGCM(_kek(self._secret, salt, self.log_n)).encrypt(_ZERO_NONCE, bytes(dek), context)
        return {"type": "scrypt", "salt": b64e(salt), "log_n": self.log_n, "ct": b64e(ct)}

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        if stanza.get("type") != "scrypt":
            return None
        log_n = stanza.get("log_n")
        if not isinstance(log_n, int) or not MIN_LOG_N <= log_n <= MAX_LOG_N:
            raise FormatError(f"scrypt stanza has an out-of-range work factor {log_n!r}")
        salt = b64d(stanza.get("salt"), what="scrypt stanza salt", length=16)
        ct = b64d(stanza.get("ct"), what="scrypt stanza", length=48)
        try:
            return bytearray(AESGCM(_kek(self._secret, salt, log_n)).decrypt(_ZERO_NONCE, ct, context))
        except InvalidTag:
            raise NoMatchingIdentityError("wrong passphrase (or the passphrase stanza was tampered with)") from None


def register(registry: Registry) -> None:
    """``passphrase-env:VAR`` as an identity (sealing to a passphrase takes a :class:`Passphrase` object)."""
    registry.spec("passphrase-env", Passphrase.from_env)
