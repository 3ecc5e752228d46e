"""The envelope shared by every sealed artifact.

Stored as JSON::

    {"protected": B64(JSON bytes), "recipients": [stanza, ...], "mac": B64(32), "signature": null | {...}}

``protected`` holds everything that describes the artifact (format, model id and version, artifact
id, segment size, payload layout, and the index of entries in clear or encrypted). It is kept as the
exact bytes that were authenticated, so nobody has to canonicalise JSON: the header MAC is
HMAC-SHA256 under a key derived from the data key over exactly those bytes. Recipient stanzas are
outside the MAC, which is what lets ``rekey`` add or remove recipients without touching anything else.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal.crypto import keys
from modelseal.crypto.segments import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE
from modelseal.encoding import b64d, b64e, lp
from modelseal.errors import (
    AuthenticationError,
    FormatError,
    NoMatchingIdentityError,
    UnsupportedVersionError,
)
from modelseal.format import schema
from modelseal.recipients.base import NOT_MINE, Identity, Recipient, Stanza, members
from modelseal.recipients.passphrase import MAX_LOG_N, MIN_LOG_N

FORMAT = "modelseal/1"
KINDS = ("safetensors", "bundle")
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+-]{1,200}$")
_INDEX_NONCE = bytes(12)  # the index key encrypts exactly one message per artifact
MAX_RECIPIENTS = 1024  # each stanza may cost an unwrap attempt (scrypt: up to a second): bound the work
# Every passphrase is tried on every scrypt stanza (a wrong one lets the next try), and one attempt may
# cost 4 GiB and seconds (log_n 22): a hostile header must not multiply that.
MAX_SCRYPT_STANZAS = 4
# Binary fields of the known stanza types and their exact decoded sizes (docs/format.md, section 4).
_STANZA_BINARY: dict[str, dict[str, int]] = {
    "x25519": {"kid": 8, "ct": 32 + 48},  # enc || AES-GCM(DEK)
    "mlkem768x25519": {"kid": 8, "ct": 1088 + 32 + 48},
    "symmetric": {"kid": 8, "salt": 16, "ct": 48},
    "scrypt": {"salt": 16, "ct": 48},
}


def dek_context(artifact_id: bytes) -> bytes:
    """What a recipient stanza is bound to: unwrapping it for another artifact fails."""
    return lp(b"modelseal/1 dek") + artifact_id


def _mac(dek: bytes | bytearray, artifact_id: bytes, protected_raw: bytes) -> bytes:
    h = chmac.HMAC(keys.derive(dek, artifact_id, keys.PURPOSE_HEADER_MAC), hashes.SHA256())
    h.update(protected_raw)
    return h.finalize()


def _index_aad(artifact_id: bytes) -> bytes:
    return lp(b"modelseal/1 index") + artifact_id


def check_id(value: str, what: str) -> str:
    """Model ids and versions are short printable tokens (they appear in AAD, logs and paths)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise FormatError(f"{what} {value!r:.80} must be 1-200 characters of letters, digits and ._:@/+-")
    return value


@dataclass
class Envelope:
    """A parsed (not yet opened) envelope."""

    protected_raw: bytes
    protected: dict[str, Any]
    recipients: list[Stanza]
    mac: bytes
    signature: dict[str, str] | None = None

    @property
    def artifact_id(self) -> bytes:
        return b64d(self.protected["artifact_id"], what="artifact_id", length=keys.ARTIFACT_ID_SIZE)

    @property
    def model_id(self) -> str:
        return str(self.protected["model_id"])

    @property
    def model_version(self) -> str:
        return str(self.protected["model_version"])

    @property
    def hidden(self) -> bool:
        return "index_ct" in self.protected

    def to_json(self) -> str:
        return json.dumps(
            {
                "protected": b64e(self.protected_raw),
                "recipients": self.recipients,
                "mac": b64e(self.mac),
                "signature": self.signature,
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: str | bytes, source: str) -> Envelope:
        """Parse an envelope and check it against its schema (every field's type and size); no key needed."""
        what = f"{source}: the modelseal envelope"
        obj = schema.obj(schema.document(text, what), what)
        missing = {"protected", "recipients", "mac"} - obj.keys()
        if missing:
            raise FormatError(f"{what} is missing required fields: {', '.join(sorted(missing))}")
        raw = b64d(obj["protected"], what=f"{source}: protected header")
        what = f"{source}: the protected header"
        protected = schema.obj(schema.document(raw, what), what)
        fmt = protected.get("format")
        if fmt != FORMAT:
            if isinstance(fmt, str) and fmt.startswith("modelseal/"):
                raise UnsupportedVersionError(
                    f"{source} uses format {fmt:.40}; this modelseal reads {FORMAT}: upgrade modelseal"
                )
            raise FormatError(f"{source}: unknown format {fmt!r:.60}")
        _validate_protected(protected, source)
        recipients = _validate_recipients(obj["recipients"], source)
        sig = _validate_signature(obj.get("signature"), source)
        return cls(raw, protected, recipients, b64d(obj["mac"], what=f"{source}: mac", length=32), sig)

    def unwrap(self, identity: Identity, source: str, dek_cache: dict[bytes, bytearray] | None = None) -> bytearray:
        """Recover and authenticate the data key; raise a specific error if that is impossible."""
        group = self.protected.get("group")
        group_id = b64d(group["id"], what="group id") if group else None
        if dek_cache is not None and group_id in dek_cache:
            cached = dek_cache[group_id]  # type: ignore[index]
            if hmac.compare_digest(_mac(cached, self.artifact_id, self.protected_raw), self.mac):
                return cached
        context = dek_context(self.artifact_id)
        refusals: list[Exception] = []
        for stanza in self.recipients:
            for member in members(identity):
                try:
                    dek = member.unwrap(stanza, context)
                except NOT_MINE as exc:  # "not mine": the next identity or stanza may still open it
                    refusals.append(exc)
                    continue
                if dek is None:
                    continue
                if len(dek) != keys.DEK_SIZE:
                    raise AuthenticationError(f"{source}: the unwrapped data key has the wrong size")
                self.check_mac(dek, source)
                if dek_cache is not None and group_id is not None:
                    dek_cache[group_id] = dek
                return dek
        raise _no_identity(source, identity, self.recipients, refusals)

    def check_mac(self, dek: bytes | bytearray, source: str) -> None:
        if not hmac.compare_digest(_mac(dek, self.artifact_id, self.protected_raw), self.mac):
            raise AuthenticationError(
                f"{source}: the header failed authentication: it was modified, or belongs to another artifact"
            )

    def index(self, dek: bytes | bytearray, source: str) -> dict[str, Any]:
        """The entry index: in clear in ``protected["index"]``, or decrypted from ``index_ct``."""
        if not self.hidden:
            idx = self.protected["index"]
        else:
            key = keys.derive(dek, self.artifact_id, keys.PURPOSE_INDEX)
            ct = b64d(self.protected["index_ct"], what=f"{source}: encrypted index")
            try:
                raw = AESGCM(key).decrypt(_INDEX_NONCE, ct, _index_aad(self.artifact_id))
            except InvalidTag:
                raise AuthenticationError(f"{source}: the encrypted index failed authentication") from None
            idx = schema.document(raw, f"{source}: the decrypted index")
        return _validate_index(idx, source)


def _no_identity(source: str, identity: Identity, stanzas: list[Stanza], refusals: list[Exception]) -> Exception:
    """The error when nothing unwrapped: the one reason given, or every reason, or who it is sealed to."""
    reasons = list(dict.fromkeys(str(r) for r in refusals))  # distinct, in the order they happened
    if len(reasons) == 1:
        return refusals[0]  # keeps its type and code (``revoked``, wrong passphrase, ...)
    kinds = ", ".join(sorted({f"{s['type']}" + (f" (kid {s['kid']})" if "kid" in s else "") for s in stanzas}))
    tried = f"; tried: {'; '.join(reasons)}" if reasons else ""
    return NoMatchingIdentityError(
        f"{source}: none of your identities ({identity.describe()}) can unwrap its data key; "
        f"it is sealed to: {kinds or 'nobody'}{tried}"
    )


def _validate_protected(p: dict[str, Any], source: str) -> None:
    """The protected header's schema (docs/format.md, section 4); runs on every parse, MAC or not."""
    what = f"{source}: protected header"
    if p.get("kind") not in KINDS:
        raise FormatError(f"{source}: unknown artifact kind {p.get('kind')!r:.60}")
    check_id(p.get("model_id"), f"{source}: model id")  # type: ignore[arg-type]
    check_id(p.get("model_version"), f"{source}: model version")  # type: ignore[arg-type]
    b64d(p.get("artifact_id"), what=f"{source}: artifact_id", length=keys.ARTIFACT_ID_SIZE)
    seg = p.get("segment_size")
    if isinstance(seg, bool) or not isinstance(seg, int) or not MIN_SEGMENT_SIZE <= seg <= MAX_SEGMENT_SIZE:
        raise FormatError(f"{source}: segment size {seg!r:.40} is out of range")
    for name in ("payload_size", "tag_count"):
        schema.integer(p.get(name), f"{what} field {name}")
    if "group" in p:
        _validate_group(p["group"], f"{what} field group")
    if ("index" in p) == ("index_ct" in p):
        raise FormatError(f"{source}: the header must hold exactly one of index / index_ct")
    if "index_ct" in p:
        schema.string(p["index_ct"], f"{what} field index_ct", max_len=schema.MAX_HEADER)
    elif p["kind"] == "bundle":
        raise FormatError(f"{source}: a sealed bundle must hide its index (index_ct)")
    else:
        _validate_index(p["index"], source)


def _validate_group(value: Any, what: str) -> None:
    """A sealed directory's group: its id, this file's path, and every member's path (sorted, unique)."""
    group = schema.obj(value, what)
    b64d(group.get("id"), what=f"{what} id", length=16)
    path = schema.relpath(group.get("path"), f"{what} path")
    members = schema.strings(group.get("members"), f"{what} members")
    for i, m in enumerate(members):
        schema.relpath(m, f"{what} members[{i}]")
    if members != sorted(set(members)) or path not in members:
        raise FormatError(f"{what}: the member list must be sorted, unique, and hold the file's own path")


def _validate_index(value: Any, source: str) -> dict[str, Any]:
    """What every index has: an object with an ``entries`` array (entries: ``entries_from_index``)."""
    idx = schema.obj(value, f"{source}: the index")
    schema.array(idx.get("entries"), f"{source}: the index's entries")
    return idx


def _validate_recipients(value: Any, source: str) -> list[Stanza]:
    """Recipient stanzas: a bounded list of objects with a ``type``; known types have exact field types."""
    stanzas = schema.array(value, f"{source}: the recipient stanzas")
    if len(stanzas) > MAX_RECIPIENTS:
        raise FormatError(f"{source} lists {len(stanzas)} recipient stanzas, more than the limit of {MAX_RECIPIENTS}")
    _check_passphrase_count(stanzas, source)
    for i, stanza in enumerate(stanzas):
        what = f"{source}: recipient stanza {i}"
        schema.obj(stanza, what)
        kind = schema.string(stanza.get("type"), f"{what} type", min_len=1, max_len=64)
        for name, size in _STANZA_BINARY.get(kind, {}).items():
            b64d(stanza.get(name), what=f"{what} ({kind}) field {name}", length=size)
        if kind == "scrypt":
            schema.integer(stanza.get("log_n"), f"{what} (scrypt) field log_n", MIN_LOG_N, MAX_LOG_N)
        elif kind == "keyserver":
            schema.string(stanza.get("url"), f"{what} (keyserver) field url", min_len=1, max_len=2048)
            schema.string(stanza.get("model"), f"{what} (keyserver) field model", min_len=1, max_len=200)
            schema.string(stanza.get("key_id"), f"{what} (keyserver) field key_id", min_len=1, max_len=64)
        if "kid" in stanza:  # shown in "no matching identity" messages, even for unknown types
            schema.string(stanza["kid"], f"{what} field kid", max_len=64)
    return stanzas


def _check_passphrase_count(stanzas: list[Stanza], source: str) -> None:
    count = sum(1 for s in stanzas if isinstance(s, dict) and s.get("type") == "scrypt")
    if count > MAX_SCRYPT_STANZAS:
        raise FormatError(
            f"{source} has {count} passphrase (scrypt) stanzas, more than the limit of {MAX_SCRYPT_STANZAS}"
        )


def _validate_signature(value: Any, source: str) -> dict[str, str] | None:
    """The publisher signature block: null, or ``{"signer": "ed25519:...", "sig": B64(64 bytes)}``."""
    if value is None:
        return None
    what = f"{source}: the signature block"
    sig = schema.obj(value, what)
    signer = schema.string(sig.get("signer"), f"{what} signer", max_len=200)
    if not signer.startswith("ed25519:"):
        raise FormatError(f"{what}: unknown signer kind (expected ed25519:...)")
    b64d(sig.get("sig"), what=f"{what} sig", length=64)
    return sig


@dataclass
class EnvelopeBuilder:
    """Builds the envelope of a new artifact (the sealing side)."""

    kind: str
    model_id: str
    model_version: str
    segment_size: int
    dek: bytearray
    artifact_id: bytes = field(default_factory=keys.new_artifact_id)

    def build(
        self,
        index: dict[str, Any],
        *,
        hidden: bool,
        payload_size: int,
        tag_count: int,
        recipients: list[Recipient],
        group: dict[str, Any] | None = None,
    ) -> Envelope:
        check_id(self.model_id, "model id")
        check_id(self.model_version, "model version")
        protected: dict[str, Any] = {
            "format": FORMAT,
            "kind": self.kind,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "artifact_id": b64e(self.artifact_id),
            "segment_size": self.segment_size,
            "payload_size": payload_size,
            "tag_count": tag_count,
        }
        if group is not None:
            protected["group"] = group
        if hidden:
            key = keys.derive(self.dek, self.artifact_id, keys.PURPOSE_INDEX)
            raw_index = json.dumps(index, separators=(",", ":")).encode()
            protected["index_ct"] = b64e(AESGCM(key).encrypt(_INDEX_NONCE, raw_index, _index_aad(self.artifact_id)))
        else:
            protected["index"] = index
        raw = json.dumps(protected, separators=(",", ":")).encode()
        context = dek_context(self.artifact_id)
        stanzas = [r.wrap(bytes(self.dek), context) for r in recipients]
        _check_passphrase_count(stanzas, "the new artifact")
        return Envelope(raw, protected, stanzas, _mac(self.dek, self.artifact_id, raw))

    def payload_key(self) -> bytes:
        return keys.derive(self.dek, self.artifact_id, keys.PURPOSE_PAYLOAD)
