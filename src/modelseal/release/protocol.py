"""The key-release wire protocol, shared by the key service and the agent (spec: docs/key-release.md).

1. The host asks for a challenge for one key id over mTLS and gets a fresh 32-byte nonce, single use,
   tied to its certificate key and that key id.
2. It makes an ephemeral X25519 key pair and computes the *binding*
   ``SHA-256(lp(domain) ‖ lp(nonce) ‖ lp(client-cert key hash) ‖ lp(ephemeral public key))``;
   attestation evidence carries the binding in its report data, so the evidence, the nonce, the TLS
   client and the key the answer is wrapped to are all the same party.
3. The service decides, then answers with a lease (exact JSON bytes, Ed25519-signed) and the data key
   HPKE-sealed to the ephemeral key with ``info`` binding the domain, the binding and the lease hash.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from modelseal.encoding import b64d, b64e, lp
from modelseal.errors import FormatError, KeyReleaseError
from modelseal.jsonlimits import loads_bounded

# a model name, as the key service accepts it and the agent checks it before logging or forwarding it
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")



class Route:
    """The key service's HTTP routes, named once for the service (``keyserver/app.py``), the agent and
    the admin client."""

    HEALTH = "/v1/health"  # liveness: the process answers
    READY = "/v1/ready"  # readiness: and its database answers
    INFO = "/v1/info"  # no credentials: the lease-signing public key, the evidence kinds
    CHALLENGE = "/v1/challenge"
    RELEASE = "/v1/release"
    KEYS = "/v1/keys"  # the keys a live grant gives the calling host
    ADMIN = "/v1/admin"
    MODELS = "/v1/admin/models"
    ADMIN_KEYS = "/v1/admin/keys"
    GRANTS = "/v1/admin/grants"
    REVOKE = "/v1/admin/grants/{grant_id}/revoke"
    ROTATE_MASTER_KEY = "/v1/admin/master-key/rotate"
    AUDIT = "/v1/admin/audit"
    USAGE = "/v1/admin/usage"  # usage per licence per period
    USAGE_RESET = "/v1/admin/usage/reset"  # forget a host's usage-log head (a lost or damaged log)


BINDING_DOMAIN = b"modelseal/1 key-release binding"
LEASE_DOMAIN = b"modelseal/1 key-release lease"
WRAP_DOMAIN = b"modelseal/1 key-release wrap"
NONCE_BYTES = 32
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_RAW = (ser.Encoding.Raw, ser.PublicFormat.Raw)


def binding(nonce: bytes, client_spki_hash: bytes, ephemeral_public: bytes) -> bytes:
    """The 32 bytes evidence must carry in its report data (see module docstring)."""
    data = lp(BINDING_DOMAIN) + lp(nonce) + lp(client_spki_hash) + lp(ephemeral_public)
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class Lease:
    """What the service promises about one release: which key, to whom, until when."""

    lease_id: str
    key_id: str
    model: str
    grant_id: str
    host: str
    issued_at: int
    renew_after: int
    expires_at: int
    grace_s: int
    binding: str
    terms: dict[str, Any] = field(default_factory=dict)  # the grant's licence terms (release/terms.py)
    # for a metered grant: {"period_start": ..., "used": {...}, "seq": ...}: the grant's usage this period
    # over every host, counting this host's usage log up to entry ``seq`` (what this release reported)
    usage: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Lease:
        try:
            data = loads_bounded(raw, max_bytes=16 * 1024, max_depth=3, what="the lease")
            lease = cls(**data)
        except (FormatError, TypeError) as exc:
            raise FormatError(f"malformed lease from the key service: {exc}") from None
        ints = (lease.issued_at, lease.renew_after, lease.expires_at, lease.grace_s)
        if not all(isinstance(v, int) for v in ints):
            raise FormatError("malformed lease from the key service: times must be integers")
        if not isinstance(lease.terms, dict) or not isinstance(lease.usage, dict):
            raise FormatError("malformed lease from the key service: terms and usage must be objects")
        return lease


def _info(bind: bytes, lease_bytes: bytes) -> bytes:
    return lp(WRAP_DOMAIN) + lp(bind) + lp(hashlib.sha256(lease_bytes).digest())


def seal_release(
    dek: bytes | bytearray, lease: Lease, ephemeral_public: bytes, signer: ed25519.Ed25519PrivateKey
) -> dict[str, str]:
    """Build the service's answer: signed lease plus the key wrapped to the host's ephemeral key."""
    lease_bytes = lease.to_bytes()
    public = x25519.X25519PublicKey.from_public_bytes(ephemeral_public)
    wrapped = _SUITE.encrypt(bytes(dek), public, info=_info(b64d(lease.binding), lease_bytes))
    return {
        "lease": b64e(lease_bytes),
        "signature": b64e(signer.sign(lp(LEASE_DOMAIN) + lease_bytes)),
        "wrapped_key": b64e(wrapped),
    }


class EphemeralKey:
    """The host side of one release: an X25519 key pair used once."""

    def __init__(self) -> None:
        self._private = x25519.X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(*_RAW)

    def open_release(
        self, answer: Any, *, nonce: bytes, client_spki_hash: bytes, key_id: str, service_key: ed25519.Ed25519PublicKey
    ) -> tuple[Lease, bytearray]:
        """Check the signed lease and unwrap the key; any mismatch raises :class:`KeyReleaseError`."""
        if not isinstance(answer, dict):
            raise KeyReleaseError("bad_answer", "the key service sent a malformed release answer")
        try:
            lease_bytes = b64d(answer.get("lease"), what="lease")
            signature = b64d(answer.get("signature"), what="lease signature", length=64)
            wrapped = b64d(answer.get("wrapped_key"), what="wrapped key")
        except FormatError as exc:
            raise KeyReleaseError("bad_answer", f"the key service sent a malformed release answer: {exc}") from None
        try:
            service_key.verify(signature, lp(LEASE_DOMAIN) + lease_bytes)
        except InvalidSignature:
            raise KeyReleaseError(
                "bad_signature", "the lease is not signed by the pinned key-service key (wrong service or tampering)"
            ) from None
        lease = Lease.from_bytes(lease_bytes)
        bind = binding(nonce, client_spki_hash, self.public)
        if lease.binding != b64e(bind) or lease.key_id != key_id:
            raise KeyReleaseError("bad_answer", "the lease is for another exchange (binding or key id differs)")
        try:
            dek = bytearray(_SUITE.decrypt(wrapped, self._private, info=_info(bind, lease_bytes)))
        except (InvalidTag, ValueError):
            raise KeyReleaseError("bad_answer", "the wrapped key does not decrypt for this exchange") from None
        if len(dek) != 32:
            raise KeyReleaseError("bad_answer", "the released key has the wrong length")
        return lease, dek


def now() -> int:
    return int(time.time())


def load_service_public_key(text: str) -> ed25519.Ed25519PublicKey:
    """Parse the key service's lease-signing key as printed by ``modelseal keyserver init``."""
    raw = b64d(text.removeprefix("ed25519:"), what="key-service public key", length=32)
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def service_public_key_text(key: ed25519.Ed25519PrivateKey) -> str:
    return "ed25519:" + b64e(key.public_key().public_bytes(*_RAW))
