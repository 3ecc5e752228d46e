"""An in-process :class:`~modelseal.keyserver.store.Store`: the key service's state in dictionaries.

It keeps the same promises as the SQL store, so the service's decisions can be exercised (and a
tool can run the service) without a database: one transaction at a time (a lock stands in for the
audit-head row lock), all-or-nothing (a transaction works on copies of the tables and publishes
them only when it ends normally), primary keys and the model references checked like the schema's
constraints, and the same hash-chained audit log. State lives as long as the object: nothing is
written anywhere. Each transaction copies the table indexes (not the records), which suits tests
and tools, not a production key service with a large history.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from modelseal.keyserver import auditchain
from modelseal.keyserver.store import (
    AuditEntry,
    ChallengeRecord,
    GrantRecord,
    GrantUse,
    KeyRecord,
    LeaseRecord,
    ModelRecord,
    ModelSummary,
    UsageHeadRecord,
    UsageRecord,
    UsageTotal,
)
from modelseal.release.terms import Usage

R = TypeVar("R")
K = TypeVar("K")


class StoreIntegrityError(ValueError):
    """A write the SQL schema's constraints would refuse (duplicate id, unknown model or grant)."""


def _insert(table: dict[K, R], key: K, record: R, what: str) -> None:
    if key in table:
        raise StoreIntegrityError(f"{what} {key} already exists")
    table[key] = record


@dataclass
class _Tables:
    models: dict[str, ModelRecord] = field(default_factory=dict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    grants: dict[str, GrantRecord] = field(default_factory=dict)
    grant_hosts: dict[str, dict[str, int]] = field(default_factory=dict)  # grant id -> host -> first seen
    challenges: dict[str, ChallengeRecord] = field(default_factory=dict)
    leases: dict[str, LeaseRecord] = field(default_factory=dict)
    usage_heads: dict[tuple[str, str], UsageHeadRecord] = field(default_factory=dict)  # (host, log) -> head
    usage: dict[tuple[str, str], UsageRecord] = field(default_factory=dict)  # (host, digest) -> entry

    def copy(self) -> _Tables:
        return _Tables(
            dict(self.models), dict(self.keys), dict(self.grants),
            {g: dict(hosts) for g, hosts in self.grant_hosts.items()}, dict(self.challenges), dict(self.leases),
            dict(self.usage_heads), dict(self.usage),
        )  # fmt: skip


class MemoryTransaction:
    """:class:`~modelseal.keyserver.store.Transaction` on private copies of the tables."""

    def __init__(self, tables: _Tables, head: tuple[int, str]) -> None:
        self.tables, self.head = tables, head
        self.appended: list[AuditEntry] = []

    def has_model(self, name: str) -> bool:
        return name in self.tables.models

    def add_model(self, model: ModelRecord) -> None:
        _insert(self.tables.models, model.name, model, "model")

    def key(self, key_id: str) -> KeyRecord | None:
        return self.tables.keys.get(key_id)

    def add_key(self, key: KeyRecord) -> None:
        self._need_model(key.model)
        _insert(self.tables.keys, key.key_id, key, "key")

    def keys(self) -> list[KeyRecord]:
        return list(self.tables.keys.values())

    def rewrap_key(self, key_id: str, wrapped: bytes, wrap_version: str) -> None:
        key = self.tables.keys.get(key_id)
        if key is not None:
            self.tables.keys[key_id] = replace(key, wrapped=wrapped, wrap_version=wrap_version)

    def grant(self, grant_id: str) -> GrantRecord | None:
        return self.tables.grants.get(grant_id)

    def add_grant(self, grant: GrantRecord) -> None:
        self._need_model(grant.model)
        _insert(self.tables.grants, grant.grant_id, grant, "grant")

    def grants_for_model(self, model: str, include_revoked: bool, identities: Sequence[str]) -> list[GrantRecord]:
        rows = [
            g for g in self.tables.grants.values()
            if g.model == model and (include_revoked or g.revoked_at is None) and g.identity in identities
        ]  # fmt: skip
        rows.sort(key=lambda g: g.grant_id)
        rows.sort(key=lambda g: g.created_at, reverse=True)  # stable: newest first, ties by grant id
        return rows

    def revoke_grant(self, grant_id: str, at: int, reason: str) -> None:
        grant = self.tables.grants.get(grant_id)
        if grant is not None:
            self.tables.grants[grant_id] = replace(grant, revoked_at=at, revoke_reason=reason)

    def grant_hosts(self, grant_id: str) -> set[str]:
        return set(self.tables.grant_hosts.get(grant_id, {}))

    def record_release(self, lease: LeaseRecord, new_host: bool) -> None:
        grant = self.tables.grants.get(lease.grant_id)
        if grant is None:
            raise StoreIntegrityError(f"lease {lease.lease_id} names no stored grant {lease.grant_id}")
        _insert(self.tables.leases, lease.lease_id, lease, "lease")
        self.tables.grants[grant.grant_id] = replace(grant, releases=grant.releases + 1)
        if new_host:
            _insert(self.tables.grant_hosts.setdefault(grant.grant_id, {}), lease.host, lease.issued_at, "grant host")

    def add_challenge(self, challenge: ChallengeRecord) -> None:
        _insert(self.tables.challenges, challenge.nonce, challenge, "challenge")

    def purge_challenges(self, expired_before: int) -> None:
        table = self.tables.challenges
        for nonce in [n for n, c in table.items() if c.expires_at < expired_before]:
            del table[nonce]

    def challenge(self, nonce: str) -> ChallengeRecord | None:
        return self.tables.challenges.get(nonce)

    def usage_head(self, host: str, log: str) -> UsageHeadRecord | None:
        return self.tables.usage_heads.get((host, log))

    def put_usage_head(self, head: UsageHeadRecord) -> None:
        self.tables.usage_heads[(head.host, head.log)] = head

    def reset_usage_head(self, host: str, log: str | None) -> int:
        heads = self.tables.usage_heads
        gone = [k for k in heads if k[0] == host and log in (None, k[1])]
        for k in gone:
            del heads[k]
        return len(gone)

    def leased(self, host: str, key_id: str, grant_id: str, at: int, slack: int) -> bool:
        return any(
            lease.host == host and lease.key_id == key_id and lease.grant_id == grant_id
            and lease.issued_at - slack <= at <= lease.expires_at + slack
            for lease in self.tables.leases.values()
        )  # fmt: skip

    def add_usage(self, rows: list[UsageRecord]) -> int:
        new = 0
        for row in rows:
            if row.grant_id not in self.tables.grants:
                raise StoreIntegrityError(f"usage names no stored grant {row.grant_id}")
            if (row.host, row.digest) not in self.tables.usage:
                self.tables.usage[(row.host, row.digest)] = row
                new += 1
        return new

    def usage_of(self, grant_id: str, since: int) -> Usage:
        total = Usage()
        for row in self.tables.usage.values():
            if row.grant_id == grant_id and row.at >= since:
                total = total + row.usage
        return total

    def append_audit(self, event: dict[str, Any]) -> AuditEntry:
        entry = auditchain.next_entry(self.head, event)
        self.appended.append(entry)
        self.head = (entry.seq, entry.hash)
        return entry

    def _need_model(self, name: str) -> None:
        if name not in self.tables.models:
            raise StoreIntegrityError(f"no model {name} is stored")


class MemoryStore:
    """:class:`~modelseal.keyserver.store.Store` in this process's memory (see the module docstring)."""

    def __init__(self) -> None:
        self._tables = _Tables()
        self._audit: list[AuditEntry] = []
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[MemoryTransaction]:
        with self._lock:
            head = (self._audit[-1].seq, self._audit[-1].hash) if self._audit else (0, auditchain.GENESIS)
            tx = MemoryTransaction(self._tables.copy(), head)
            yield tx  # an exception here leaves the published tables and log untouched
            self._tables = tx.tables
            self._audit.extend(tx.appended)

    def models(self) -> list[ModelSummary]:
        tables = self._tables
        counts: dict[str, int] = {}
        for key in tables.keys.values():
            counts[key.model] = counts.get(key.model, 0) + 1
        return [
            ModelSummary(m.name, m.description, m.created_at, counts.get(m.name, 0))
            for m in sorted(tables.models.values(), key=lambda m: m.name)
        ]

    def grants(self, model: str | None = None) -> list[GrantUse]:
        tables = self._tables
        rows = sorted(tables.grants.values(), key=lambda g: (g.created_at, g.grant_id))
        return [GrantUse(g, len(tables.grant_hosts.get(g.grant_id, {}))) for g in rows if not model or g.model == model]

    def live_grants(self, identities: Sequence[str]) -> list[GrantRecord]:
        return [g for g in self._tables.grants.values() if g.revoked_at is None and g.identity in identities]

    def keys_of(self, models: Iterable[str]) -> list[tuple[str, str]]:
        wanted = set(models)
        return [(k.key_id, k.model) for k in self._tables.keys.values() if k.model in wanted]

    def key_grants(self, key_id: str, identities: Sequence[str]) -> tuple[str, list[GrantRecord]] | None:
        key = self._tables.keys.get(key_id)
        if key is None:
            return None
        return key.model, [g for g in self.live_grants(identities) if g.model == key.model]

    def audit_entries(self, after: int = 0, limit: int | None = None) -> list[AuditEntry]:
        rows = self._audit[max(after, 0) :]  # entry n sits at index n - 1
        return rows if limit is None else rows[:limit]

    def usage_seq(self, host: str, log: str) -> int:
        head = self._tables.usage_heads.get((host, log))
        return 0 if head is None else head.seq

    def usage_totals(
        self, since: int, until: int, period_s: int, grant_id: str | None = None, model: str | None = None
    ) -> list[UsageTotal]:
        sums: dict[tuple[str, str, int], Usage] = {}
        for row in self._tables.usage.values():
            if since <= row.at < until and grant_id in (None, row.grant_id) and model in (None, row.model):
                key = (row.grant_id, row.model, row.at - row.at % period_s)
                sums[key] = sums.get(key, Usage()) + row.usage
        return [UsageTotal(g, m, p, u) for (g, m, p), u in sorted(sums.items())]

    def audit_head(self) -> tuple[int, str] | None:
        with self._lock:
            return (self._audit[-1].seq, self._audit[-1].hash) if self._audit else (0, auditchain.GENESIS)

    def describe(self) -> str:
        return "memory"

    def schema_revision(self) -> str:
        return "memory"  # no schema: the tables are the dataclasses in store.py

    def close(self) -> None:
        """Nothing to release: the state goes with the object."""
