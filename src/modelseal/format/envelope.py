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
from modelseal.recipients.base import NOT_MINE, Identity, Recipient, Stanza, members

FORMAT = "modelseal/1"
KINDS = ("safetensors", "bundle")
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+-]{1,200}$")
_INDEX_NONCE = bytes(12)  # the index key encrypts exactly one message per artifact


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
        raise FormatError(f"{what} {value!r} must be 1-200 characters of letters, digits and ._:@/+-")
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
        """Parse and structurally validate an envelope; no key is needed."""
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{source}: the modelseal envelope is not valid JSON (file corrupt?)") from None
        if not isinstance(obj, dict) or not {"protected", "recipients", "mac"} <= obj.keys():
            raise FormatError(f"{source}: the modelseal envelope is missing required fields")
        raw = b64d(obj["protected"], what=f"{source}: protected header")
        try:
            protected = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{source}: the protected header is not valid JSON (file corrupt?)") from None
        if not isinstance(protected, dict):
            raise FormatError(f"{source}: the protected header is not a JSON object")
        fmt = protected.get("format")
        if fmt != FORMAT:
            if isinstance(fmt, str) and fmt.startswith("modelseal/"):
                raise UnsupportedVersionError(
                    f"{source} uses format {fmt}; this modelseal reads {FORMAT}: upgrade modelseal"
                )
            raise FormatError(f"{source}: unknown format {fmt!r}")
        _validate_protected(protected, source)
        recipients = obj["recipients"]
        if not isinstance(recipients, list) or not all(
            isinstance(s, dict) and isinstance(s.get("type"), str) for s in recipients
        ):
            raise FormatError(f"{source}: recipient stanzas are malformed")
        sig = obj.get("signature")
        if sig is not None and not (
            isinstance(sig, dict) and isinstance(sig.get("signer"), str) and isinstance(sig.get("sig"), str)
        ):
            raise FormatError(f"{source}: signature block is malformed")
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
            try:
                idx = json.loads(raw)
            except ValueError:
                raise FormatError(f"{source}: the decrypted index is not JSON") from None
        if not isinstance(idx, dict) or not isinstance(idx.get("entries"), list):
            raise FormatError(f"{source}: the index has no entry list")
        return idx


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
    if p.get("kind") not in KINDS:
        raise FormatError(f"{source}: unknown artifact kind {p.get('kind')!r}")
    check_id(p.get("model_id"), "model id")  # type: ignore[arg-type]
    check_id(p.get("model_version"), "model version")  # type: ignore[arg-type]
    b64d(p.get("artifact_id"), what=f"{source}: artifact_id", length=keys.ARTIFACT_ID_SIZE)
    seg = p.get("segment_size")
    if not isinstance(seg, int) or not MIN_SEGMENT_SIZE <= seg <= MAX_SEGMENT_SIZE:
        raise FormatError(f"{source}: segment size {seg!r} is out of range")
    for name in ("payload_size", "tag_count"):
        if not isinstance(p.get(name), int) or p[name] < 0:
            raise FormatError(f"{source}: {name} is missing or negative")
    group = p.get("group")
    if group is not None and not (
        isinstance(group, dict)
        and isinstance(group.get("id"), str)
        and isinstance(group.get("path"), str)
        and isinstance(group.get("members"), list)
        and all(isinstance(m, str) for m in group["members"])
    ):
        raise FormatError(f"{source}: the directory group field is malformed")
    if "index_ct" in p and not isinstance(p["index_ct"], str):
        raise FormatError(f"{source}: the encrypted index is malformed")
    if "index" in p and not (isinstance(p["index"], dict) and isinstance(p["index"].get("entries"), list)):
        raise FormatError(f"{source}: the index is malformed")
    if ("index" in p) == ("index_ct" in p):
        raise FormatError(f"{source}: the header must hold exactly one of index / index_ct")


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
        return Envelope(raw, protected, stanzas, _mac(self.dek, self.artifact_id, raw))

    def payload_key(self) -> bytes:
        return keys.derive(self.dek, self.artifact_id, keys.PURPOSE_PAYLOAD)
