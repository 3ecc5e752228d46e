"""Ed25519 publisher signatures.

The publisher signs the artifact's protected header together with a digest of every ciphertext
segment and tag. Hashing the ciphertext (not only the GCM tags) matters: anyone holding the data key,
such as a legitimate customer, could forge new ciphertext with valid GCM tags, but not a new
signature. Verification needs no data key, so a host can check provenance before asking for a key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelseal.encoding import b64d, b64e, lp
from modelseal.errors import FormatError, KeyFileError, SignatureError
from modelseal.keyfile import key_lines, read_text, write_secret

SIGNING_LABEL = "MODELSEAL-SIGNING-KEY-ED25519"
PUBLIC_PREFIX = "ed25519:"
_DOMAIN = b"modelseal/1 signature"


def content_digest(segment_digests: Iterable[bytes]) -> bytes:
    """Combine the per-segment SHA-256 digests (in tag order) into one content digest."""
    h = hashlib.sha256(b"modelseal/1 content")
    for d in segment_digests:
        h.update(d)
    return h.digest()


def segment_digest(ciphertext: bytes | memoryview, tag: bytes) -> bytes:
    """SHA-256 of one segment's ciphertext followed by its tag."""
    h = hashlib.sha256(ciphertext)
    h.update(tag)
    return h.digest()


def signed_message(protected: bytes, digest: bytes) -> bytes:
    """The exact bytes that an Ed25519 publisher signature covers."""
    return lp(_DOMAIN) + lp(protected) + lp(digest)


class Signer:
    """An Ed25519 signing key (the model owner's)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Signer:
        for label, raw in key_lines(read_text(path), str(path)):
            if label == SIGNING_LABEL and len(raw) == 32:
                return cls(Ed25519PrivateKey.from_private_bytes(raw))
        raise KeyFileError(f"{path} holds no {SIGNING_LABEL} line (make one with `modelseal keygen --signing`)")

    def save(self, path: str | os.PathLike[str], force: bool = False) -> None:
        from cryptography.hazmat.primitives import serialization as s

        raw = self._key.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())
        write_secret(path, SIGNING_LABEL, raw, ["modelseal Ed25519 signing key", f"public: {self.public}"], force)

    @property
    def public(self) -> str:
        return public_string(self._key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def public_string(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization as s

    return PUBLIC_PREFIX + b64e(key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw))


def parse_public(text: str) -> Ed25519PublicKey:
    """Parse ``ed25519:BASE64``, the text of a public-key file (``"$(cat publisher.pub)"``, comment lines
    and all), or the path of a file containing it (a public line or a signing key file)."""
    text = text.strip()
    if not text.startswith(PUBLIC_PREFIX) and "\n" in text:
        found = _public_line(text)
        if found is not None:
            return parse_public(found)
    if not text.startswith(PUBLIC_PREFIX) and os.path.exists(text):
        found = _public_line(read_text(text))
        if found is not None:
            return parse_public(found)
        return Signer.load(text)._key.public_key()
    if not text.startswith(PUBLIC_PREFIX):
        raise KeyFileError(f"not an Ed25519 public key (expected {PUBLIC_PREFIX}BASE64 or a key file): {text[:40]!r}")
    try:
        raw = b64d(text[len(PUBLIC_PREFIX) :], what="Ed25519 public key", length=32)
    except FormatError as exc:
        raise KeyFileError(str(exc)) from None
    return Ed25519PublicKey.from_public_bytes(raw)


def _public_line(content: str) -> str | None:
    """The ``ed25519:...`` line of key-file text (``keygen`` also writes it as a ``# public:`` comment)."""
    for line in content.splitlines():
        line = line.strip().removeprefix("# public: ")
        if line.startswith(PUBLIC_PREFIX):
            return line
    return None


def verify(signer_public: str, signature: bytes, message: bytes, trusted: list[str]) -> None:
    """Check that ``signer_public`` is trusted and its signature over ``message`` is valid."""
    wanted = {public_string(parse_public(t)) for t in trusted}
    if signer_public not in wanted:
        raise SignatureError(f"artifact is signed by {signer_public}, which is not among the trusted signers")
    try:
        parse_public(signer_public).verify(signature, message)
    except InvalidSignature:
        raise SignatureError(
            f"publisher signature by {signer_public} is invalid: the header or the encrypted data was changed"
        ) from None
