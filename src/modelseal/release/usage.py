"""The host's usage log and its reports: signed, hash-chained entries the agent writes and the key service
checks (spec: docs/licensing.md).

Each line of the log is one entry, canonical JSON (sorted keys, no spaces) with an Ed25519 signature over
``lp(ENTRY_DOMAIN) ‖ body`` in its ``sig`` field. ``prev`` is the SHA-256 of the previous line, so the log
is a chain: an entry cannot be removed, changed or reordered without breaking every later link. ``seq``
counts entries from 1 (the monotonic counter). Entry 1 (``kind: open``) names the host's certificate key
hash, the log's public key and a random log id: each agent keeps its own chain, so several agents
sharing one certificate (a Kubernetes node pool) are several chains of one host. Every ``usage`` entry
records one batch of counts for one grant (``delta``) and that grant's running totals in this log
(``total``), so a rolled-back log shows totals that shrink.
``source``/``source_seq`` name the reporting process and its report number: a report retried after a
lost answer is recognised and not counted twice.

With each release the agent sends the entries the key service has not yet acknowledged (at most
:data:`MAX_REPORT`) and a *head statement*: the last of them (``seq`` and hash) and how many entries its
log holds beyond it, signed together with that release's nonce, so an old report cannot be replayed,
a release without one is seen to withhold, and a backlog that is not drained is seen too.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519

from modelseal.encoding import b64d, b64e, lp
from modelseal.errors import FormatError
from modelseal.jsonlimits import loads_bounded
from modelseal.release.protocol import MODEL_NAME
from modelseal.release.terms import Usage

ENTRY_DOMAIN = b"modelseal/1 usage-log entry"
HEAD_DOMAIN = b"modelseal/1 usage-log head"
KEY_PREFIX = "ed25519:"
MAX_LINE = 2048  # bytes of one entry line
MAX_REPORT = 64  # entries in one release (~30 KB, inside the key service's 64 KiB body); the agent sends a
# longer backlog in early renewals
CLOCK_SKEW_S = 300  # clocks may differ this much: how far back a new log's first report reaches, lease slack


class UsageLogError(FormatError):
    """An entry or report that does not verify: bad signature, broken chain, shrinking totals, replay."""


def public_key_text(key: ed25519.Ed25519PublicKey) -> str:
    return KEY_PREFIX + b64e(key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))


def load_public_key(text: Any) -> ed25519.Ed25519PublicKey:
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise UsageLogError("the usage log's public key is not ed25519:...")
    return ed25519.Ed25519PublicKey.from_public_bytes(b64d(text[len(KEY_PREFIX) :], what="usage key", length=32))


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(line: bytes) -> bytes:
    """The hash the next entry's ``prev`` names."""
    return hashlib.sha256(lp(ENTRY_DOMAIN) + line).digest()


def sign_entry(body: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> bytes:
    """The log line (without newline) for ``body``: its canonical JSON with the signature added."""
    return canonical({**body, "sig": b64e(key.sign(lp(ENTRY_DOMAIN) + canonical(body)))})


def head_message(seq: int, head: bytes, nonce: bytes, pending: int) -> bytes:
    """What a head statement signs: the last entry this report carries, the nonce of the release, and how
    many entries the log holds beyond it (a backlog the key service lets stand for ``report_grace_s``)."""
    return lp(HEAD_DOMAIN) + struct.pack(">Q", seq) + lp(head) + lp(nonce) + struct.pack(">Q", pending)


@dataclass(frozen=True)
class Entry:
    """One verified entry."""

    seq: int
    at: int
    kind: str
    body: dict[str, Any]
    line: bytes

    @property
    def grant(self) -> str:
        return str(self.body.get("grant", ""))

    @property
    def delta(self) -> Usage:
        return Usage.from_json(self.body.get("delta", {}))


@dataclass
class Head:
    """Where a chain stands after its last verified entry: what the next entry must continue."""

    key: str = ""  # the log's public key (from entry 1)
    host: str = ""
    log: str = ""  # the log's id (from entry 1)
    seq: int = 0
    digest: bytes = b""
    at: int = 0
    totals: dict[str, Usage] = field(default_factory=dict)  # grant -> running totals

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "host": self.host, "log": self.log, "seq": self.seq, "digest": b64e(self.digest),
            "at": self.at,
            "totals": {g: u.to_json() for g, u in sorted(self.totals.items())},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Head:
        return cls(
            key=data["key"], host=data["host"], log=data["log"], seq=data["seq"],
            digest=b64d(data["digest"], what="head digest"),
            at=data["at"], totals={g: Usage.from_json(u) for g, u in data["totals"].items()},
        )  # fmt: skip


_USAGE_FIELDS = {"v", "seq", "prev", "at", "kind", "grant", "key_id", "model", "source", "source_seq",
                 "delta", "total", "sig"}  # fmt: skip
_OPEN_FIELDS = {"v", "seq", "prev", "at", "kind", "host", "key", "log", "sig"}
LOG_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
ID = re.compile(r"[A-Za-z0-9_=-]{1,64}")  # grant and key ids, as the key service issues them
# what a usage entry's names may be: checked before any reaches a database or a log line
_NAMES = {"grant": ID, "key_id": ID, "model": MODEL_NAME, "source": re.compile(r"[0-9]{1,10}\.[A-Za-z0-9_=-]{1,64}")}


def parse_line(line: bytes) -> tuple[dict[str, Any], bytes]:
    """(body without ``sig``, signature) of a line that is canonical JSON of the right shape."""
    if len(line) > MAX_LINE:
        raise UsageLogError(f"a usage entry is at most {MAX_LINE} bytes")
    try:
        data = loads_bounded(line, max_bytes=MAX_LINE, max_depth=3, what="a usage entry")
    except FormatError as exc:
        raise UsageLogError(f"a usage entry is not JSON: {exc}") from None
    if not isinstance(data, dict) or canonical(data) != line:
        raise UsageLogError("a usage entry is not canonical JSON (sorted keys, no spaces)")
    allowed = _OPEN_FIELDS if data.get("kind") == "open" else _USAGE_FIELDS
    if data.get("kind") not in ("open", "usage") or set(data) != allowed:
        raise UsageLogError("a usage entry has an unknown kind or the wrong fields")
    if type(data["v"]) is not int or data["v"] != 1 or not all(type(data[k]) is int for k in ("seq", "at")):
        raise UsageLogError("a usage entry has the wrong version or non-integer seq/at")
    body = dict(data)
    return body, b64d(body.pop("sig"), what="usage entry signature", length=64)


class ChainVerifier:
    """Verifies entries one by one, continuing from ``head``; the agent checks its own log with it at
    start, the key service each report against the head it stored."""

    def __init__(self, head: Head | None = None) -> None:
        self.head = head or Head()
        self._key = load_public_key(self.head.key) if self.head.key else None

    def add(self, line: bytes) -> Entry:
        body, sig = parse_line(line)
        head = self.head
        seq, at = body["seq"], body["at"]
        if seq != head.seq + 1:
            why = "repeats or rolls back" if seq <= head.seq else "skips"
            raise UsageLogError(f"usage entry {seq} {why} the log (expected entry {head.seq + 1})")
        if body["prev"] != (b64e(head.digest) if head.seq else ""):
            raise UsageLogError(f"usage entry {seq} does not continue the chain (its prev hash differs)")
        if at < head.at:
            raise UsageLogError(f"usage entry {seq} is dated before the entry it follows")
        if body["kind"] == "open":
            if seq != 1:
                raise UsageLogError(f"usage entry {seq} reopens the log")
            key = load_public_key(body["key"])
            _verify(key, sig, body, seq)
            log_id = body["log"]
            if not isinstance(body["host"], str) or not isinstance(log_id, str) or not LOG_ID.fullmatch(log_id):
                raise UsageLogError("the usage log's opening entry names no host or log id")
            if head.log and body["log"] != head.log:
                raise UsageLogError(f"the usage log {body['log']} is not log {head.log}")
            self._key, head.key, head.host, head.log = key, body["key"], body["host"], body["log"]
        else:
            if self._key is None:
                raise UsageLogError("the usage log does not start with its opening entry")
            _verify(self._key, sig, body, seq)
            for name, pattern in _NAMES.items():
                if not isinstance(body[name], str) or not pattern.fullmatch(body[name]):
                    raise UsageLogError(f"usage entry {seq}: {name} does not have the syntax of one")
            if type(body["source_seq"]) is not int:
                raise UsageLogError(f"usage entry {seq}: source_seq must be an integer")
            try:
                delta = Usage.from_json(body["delta"], "delta")
                total = Usage.from_json(body["total"], "total")
            except FormatError as exc:
                raise UsageLogError(f"usage entry {seq}: {exc}") from None
            if head.totals.get(body["grant"], Usage()) + delta != total:
                raise UsageLogError(
                    f"usage entry {seq}: totals for grant {body['grant']} do not add up (rolled back or forged)"
                )
            head.totals[body["grant"]] = total
        head.seq, head.digest, head.at = seq, digest(line), at
        return Entry(seq, at, body["kind"], body, line)

    def add_all(self, lines: Iterable[bytes]) -> list[Entry]:
        return [self.add(line) for line in lines]

    def check_head(self, statement: Any, nonce: bytes) -> int:
        """A head statement must name this chain's head and be signed with ``nonce`` by the log's key;
        returns the entries the host says its log holds beyond it (``pending``)."""
        if not isinstance(statement, dict) or self._key is None:
            raise UsageLogError("the usage report has no head statement, or the log was never opened")
        seq, pending = statement.get("seq"), statement.get("pending")
        if type(pending) is not int or not 0 <= pending < 2**53:
            raise UsageLogError("the usage head statement must say how many entries are pending (a whole number)")
        try:
            head = b64d(statement.get("digest"), what="head digest", length=32)
            sig = b64d(statement.get("sig"), what="head signature", length=64)
        except FormatError as exc:
            raise UsageLogError(f"malformed usage head statement: {exc}") from None
        if seq == self.head.seq and head != self.head.digest:
            raise UsageLogError(
                f"the host's usage log entry {seq} differs from the one already reported (rolled back or replaced)"
            )
        if seq != self.head.seq:
            raise UsageLogError(
                f"the usage head statement (entry {seq}) is not the head of the reported log (entry {self.head.seq})"
            )
        try:
            self._key.verify(sig, head_message(self.head.seq, head, nonce, pending))
        except InvalidSignature:
            raise UsageLogError("the usage head statement is not signed by the log's key for this exchange") from None
        return pending


def _verify(key: ed25519.Ed25519PublicKey, sig: bytes, body: dict[str, Any], seq: int) -> None:
    try:
        key.verify(sig, lp(ENTRY_DOMAIN) + canonical(body))
    except InvalidSignature:
        raise UsageLogError(f"usage entry {seq} is not signed by the log's key (forged or altered)") from None
