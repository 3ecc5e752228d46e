"""The agent's usage log on disk: signed, hash-chained entries (format: :mod:`modelseal.release.usage`).

The signing key is derived (HKDF-SHA256) from the host's TLS private key, so it is the same after every
restart without another secret on disk, only a holder of the host's certificate key can make it, and the
key service pins its public key (named in entry 1) for that certificate at the first report. Its seed is
kept in locked, wiped memory (:class:`~modelseal.memory.locked.LockedKey`).

Each batch of counts is appended and fsynced before the agent answers the server that sent it: an
answered report is on disk, and one the server resends (same source and report number) is recognised
and not counted again, also after a restart. At start the whole log is verified; a torn last line (a
crash in the middle of a write, never acknowledged) is cut off; any other damage stops the agent, since
counts would be lost or doubled.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelseal.crypto.keys import wipe
from modelseal.encoding import b64e
from modelseal.errors import UsageError
from modelseal.memory.locked import LockedKey
from modelseal.release.terms import MAX_COUNT, Usage
from modelseal.release.usage import (
    MAX_REPORT,
    ChainVerifier,
    Head,
    UsageLogError,
    digest,
    head_message,
    public_key_text,
    sign_entry,
)

log = logging.getLogger("modelseal.agent")
KEY_INFO = b"modelseal/1 usage-log signing key"
RECENT = 100_000  # entries kept in memory to answer "used since the last report"


def derive_signing_seed(tls_key_path: str | os.PathLike[str]) -> LockedKey:
    """The usage log's Ed25519 seed, from the host's TLS private key (PEM, unencrypted)."""
    try:
        pem = bytearray(Path(tls_key_path).read_bytes())
        key = ser.load_pem_private_key(bytes(pem), password=None)
    except (OSError, ValueError, TypeError) as exc:
        why = type(exc).__name__
        raise UsageError(f"cannot read the host key {tls_key_path} to derive the usage-log key: {why}") from None
    finally:
        wipe(pem)
    der = bytearray(key.private_bytes(ser.Encoding.DER, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    try:
        seed = HKDF(hashes.SHA256(), 32, salt=None, info=KEY_INFO).derive(bytes(der))
    finally:
        wipe(der)
    return LockedKey(bytearray(seed))


@dataclass(frozen=True)
class Counted:
    """One key's counts in a report from a server: which grant and model they belong to."""

    key_id: str
    grant: str
    model: str
    usage: Usage


class UsageLogFullError(ValueError):
    """Counts that would take a running total past what a count may hold (2**53): refused, not logged."""


class UsageLog:
    def __init__(self, path: Path, seed: LockedKey, host: str, clock: Callable[[], float] = time.time) -> None:
        self.path, self.host, self.clock = path, host, clock
        self._seed = seed
        self._lock = threading.Lock()
        self.head = Head()
        self._offsets = array.array("Q")  # byte offset of entry seq (index seq - 1)
        self._size = 0
        self._sources: dict[tuple[str, str], int] = {}  # (source, key id) -> last report number logged
        self._recent: collections.deque[tuple[int, int, str, Usage]] = collections.deque(maxlen=RECENT)
        self._fd = -1
        self._reported = 0  # the last entry a release carried (acknowledged or not)
        self._broken = ""  # why a failed append could not be cut back (then nothing more is written)
        self.licensed: dict[str, tuple[str, str]] = {}  # key id -> (grant, model) of its latest entry

    @classmethod
    def open(cls, path: str | os.PathLike[str], tls_key: str | os.PathLike[str], host: str) -> UsageLog:
        """Open (verifying every entry) or create the log at ``path``; :class:`UsageError` if it is damaged
        or belongs to another host."""
        log_ = cls(Path(path), derive_signing_seed(tls_key), host)
        try:
            log_._load()
        except BaseException:
            log_.close()
            raise
        return log_

    def _key(self) -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(self._seed.view()))

    def public_key(self) -> str:
        return public_key_text(self._key().public_key())

    def _load(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot open the usage log {self.path}: {exc.strerror}") from None
        with os.fdopen(os.dup(self._fd), "rb") as file:
            data = file.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            torn = len(data) - end
            log.warning("usage log %s: cut off a torn last line (%d bytes, never acknowledged)", self.path, torn)
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        verifier = ChainVerifier()
        offset = 0
        for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
            try:
                entry = verifier.add(line)
            except UsageLogError as exc:
                raise UsageError(
                    f"the usage log {self.path} is damaged at line {number}: {exc}; keep the file for the owner, and "
                    f"ask them to reset this log (`modelseal keyserver usage reset {self.host} --log "
                    f"{verifier.head.log or '?'}`) before moving it aside"
                ) from None
            self._offsets.append(offset)
            offset += len(line) + 1
            if entry.kind == "usage":
                self._remember(entry.seq, entry.at, entry.body, entry.delta)
        self.head, self._size = verifier.head, end
        if self.head.seq == 0:
            log_id = b64e(os.urandom(12))  # this agent's chain among any others sharing the certificate
            self._append([{"kind": "open", "host": self.host, "key": self.public_key(), "log": log_id}])
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)  # the new file's name is durable too
            finally:
                os.close(directory)
        elif self.head.key != self.public_key() or self.head.host != self.host:
            raise UsageError(
                f"the usage log {self.path} belongs to another host certificate or key; give each agent its own log"
            )
        log.info("usage log %s: %d entries, head %s", self.path, self.head.seq, b64e(self.head.digest)[:12])

    def _remember(self, seq: int, at: int, body: dict[str, Any], delta: Usage) -> None:
        self._sources[(body["source"], body["key_id"])] = body["source_seq"]
        self._recent.append((seq, at, body["grant"], delta))
        self.licensed[body["key_id"]] = (body["grant"], body["model"])

    def _append(self, bodies: list[dict[str, Any]]) -> None:
        """Sign, chain, write and fsync ``bodies`` (one write), then update the head; nothing is written if
        a running total would pass 2**53 (:class:`UsageLogFullError`: no report could verify again)."""
        key, at = self._key(), max(int(self.clock()), self.head.at)
        head = dataclasses.replace(self.head, totals=dict(self.head.totals))
        lines: list[bytes] = []
        for body in bodies:
            entry = {"v": 1, "seq": head.seq + 1, "prev": b64e(head.digest) if head.seq else "", "at": at, **body}
            if body["kind"] == "open":
                head.key, head.host, head.log = body["key"], body["host"], body["log"]
            else:
                total = head.totals.get(body["grant"], Usage()) + Usage.from_json(body["delta"])
                if any(v >= MAX_COUNT for v in total.to_json().values()):
                    raise UsageLogFullError(f"the counts would take grant {body['grant']}'s total past 2**53")
                entry["total"] = total.to_json()
                head.totals[body["grant"]] = total
            line = sign_entry(entry, key)
            lines.append(line)
            head.seq, head.digest, head.at = entry["seq"], digest(line), at
        if self._broken:
            raise OSError(f"the usage log was not cut back after a failed write ({self._broken}): restart the agent")
        data = b"".join(line + b"\n" for line in lines)
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write to the usage log ({written} of {len(data)} bytes; disk full?)")
            os.fsync(self._fd)
        except OSError:
            self._cut_back()  # no fragment may stay between two entries: the next append would follow it
            raise
        for line in lines:
            self._offsets.append(self._size)
            self._size += len(line) + 1
        self.head = head

    def _cut_back(self) -> None:
        """Cut the file back to its last complete entry after a failed append."""
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = exc.strerror or str(exc)

    def record(self, source: str, report: int, counted: list[Counted]) -> int:
        """Log one report's counts (those not logged before for this source and report number); returns how
        many entries were written."""
        with self._lock:
            fresh = [c for c in counted if c.usage and self._sources.get((source, c.key_id), -1) < report]
            bodies = [
                {"kind": "usage", "grant": c.grant, "key_id": c.key_id, "model": c.model, "source": source,
                 "source_seq": report, "delta": c.usage.to_json()}
                for c in fresh
            ]  # fmt: skip
            if not bodies:
                return 0
            first = self.head.seq + 1
            self._append(bodies)
            for seq, body, c in zip(range(first, first + len(bodies)), bodies, fresh, strict=True):
                self._remember(seq, self.head.at, body, c.usage)
            return len(bodies)

    def report(self, after: int, nonce: bytes) -> dict[str, Any]:
        """What a release carries: the entries after ``after`` (the key service's acknowledged entry; at most
        :data:`MAX_REPORT`) and a head statement for the last of them, signed with ``nonce``."""
        with self._lock:
            if not 0 <= after <= self.head.seq:
                after = 0  # the service knows more than this log holds: send from the start, it will say why
            last = min(self.head.seq, after + MAX_REPORT)
            self._reported = last
            lines = [line.decode() for line in self._read(after + 1, last)]
            seq, head = (last, self.head.digest) if last == self.head.seq else (last, digest(lines[-1].encode()))
            pending = self.head.seq - last
            sig = self._key().sign(head_message(seq, head, nonce, pending))
            return {"log": self.head.log, "entries": lines,
                    "head": {"seq": seq, "digest": b64e(head), "pending": pending, "sig": b64e(sig)}}  # fmt: skip

    @property
    def log_id(self) -> str:
        return self.head.log

    def backlog(self) -> int:
        """Entries written after the last one a release carried (0 when a release has carried them all)."""
        return self.head.seq - self._reported

    def _read(self, first: int, last: int) -> list[bytes]:
        if first > last:
            return []
        start = self._offsets[first - 1]
        stop = self._offsets[last] if last < len(self._offsets) else self._size
        return os.pread(self._fd, stop - start, start).split(b"\n")[:-1]

    def used(self, grant: str, since: int, after: int) -> Usage:
        """What entries after ``after`` dated from ``since`` on count for ``grant``."""
        with self._lock:
            total = Usage()
            for seq, at, entry_grant, delta in reversed(self._recent):
                if seq <= after:
                    break
                if entry_grant == grant and at >= since:
                    total = total + delta
            return total

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._seed.wipe()
