"""The key service's :class:`~modelseal.keyserver.store.Store` on SQLAlchemy: SQLite or PostgreSQL.

A transaction is one database transaction whose first statement locks the audit-head row
(:func:`lock_head`): ``SELECT ... FOR UPDATE`` on PostgreSQL, so replicas sharing the database
serialise on it; on SQLite the write lock is already held from ``BEGIN IMMEDIATE``
(:func:`modelseal.keyserver.sqlstore.db.connect`). A spent nonce is recorded inside that locked
transaction after checking it is not there yet, so two replicas never release against one nonce. A
database that does not answer (a lock wait timed out, a lost connection) is :class:`StoreUnavailableError`,
which the service answers as 503 ``unavailable``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from modelseal.errors import ModelsealError
from modelseal.keyserver import auditchain
from modelseal.keyserver.sqlstore import db, schema
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
from modelseal.release.terms import METRICS, Usage


class StoreUnavailableError(ModelsealError):
    """The database did not answer (a lock wait timed out, the connection dropped): the service answers
    503 ``unavailable``; nothing was decided."""


def open_store(url: str, migrate: bool = True) -> SqlStore:
    """Connect to ``url`` (:func:`~modelseal.keyserver.sqlstore.db.normalise_url`), migrate the schema to
    the newest revision if asked, and refuse a schema at any other revision."""
    engine = db.connect(url)
    if migrate:
        db.migrate(engine)
    db.check_current(engine)
    return SqlStore(engine)


def lock_head(conn: Connection) -> tuple[int, str]:
    """Lock the chain head for this transaction (serialises all writers); return (seq, hash)."""
    row = conn.execute(select(schema.audit_head).where(schema.audit_head.c.id == 1).with_for_update()).one()
    return int(row.seq), str(row.hash)


def read_audit(conn: Connection, after: int = 0, limit: int | None = None) -> list[AuditEntry]:
    query = select(schema.audit).where(schema.audit.c.seq > after).order_by(schema.audit.c.seq)
    if limit is not None:
        query = query.limit(limit)
    # as stored, not coerced: a tampered row (text in seq, a BLOB entry) must reach the chain check, which
    # reports it as a broken link, rather than crash the reader
    return [AuditEntry(r.seq, r.ts_ms, r.entry, r.prev_hash, r.hash) for r in conn.execute(query)]


def _grant(row: Any) -> GrantRecord:
    return GrantRecord(
        grant_id=row.grant_id, model=row.model, identity=row.identity, not_before=row.not_before,
        not_after=row.not_after, max_hosts=row.max_hosts, max_releases=row.max_releases, releases=row.releases,
        policy=row.policy, grace_s=row.grace_s, created_at=row.created_at, evidence=json.loads(row.evidence),
        revoked_at=row.revoked_at, revoke_reason=row.revoke_reason, terms=json.loads(row.terms),
    )  # fmt: skip


def _key(row: Any) -> KeyRecord:
    return KeyRecord(row.key_id, row.model, bytes(row.wrapped), row.wrap_version, row.created_at)


class SqlTransaction:
    """:class:`~modelseal.keyserver.store.Transaction` on one connection inside ``engine.begin()``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.head = lock_head(conn)

    def has_model(self, name: str) -> bool:
        return self.conn.execute(select(schema.models.c.name).where(schema.models.c.name == name)).first() is not None

    def add_model(self, model: ModelRecord) -> None:
        self.conn.execute(
            schema.models.insert().values(name=model.name, description=model.description, created_at=model.created_at)
        )

    def key(self, key_id: str) -> KeyRecord | None:
        row = self.conn.execute(select(schema.keys).where(schema.keys.c.key_id == key_id)).first()
        return None if row is None else _key(row)

    def add_key(self, key: KeyRecord) -> None:
        self.conn.execute(
            schema.keys.insert().values(
                key_id=key.key_id, model=key.model, wrapped=key.wrapped, wrap_version=key.wrap_version,
                created_at=key.created_at,
            )
        )  # fmt: skip

    def keys(self) -> list[KeyRecord]:
        return [_key(row) for row in self.conn.execute(select(schema.keys))]

    def rewrap_key(self, key_id: str, wrapped: bytes, wrap_version: str) -> None:
        self.conn.execute(
            update(schema.keys).where(schema.keys.c.key_id == key_id).values(wrapped=wrapped, wrap_version=wrap_version)
        )

    def grant(self, grant_id: str) -> GrantRecord | None:
        row = self.conn.execute(select(schema.grants).where(schema.grants.c.grant_id == grant_id)).first()
        return None if row is None else _grant(row)

    def add_grant(self, grant: GrantRecord) -> None:
        row = {**asdict(grant), "evidence": json.dumps(grant.evidence), "terms": json.dumps(grant.terms)}
        self.conn.execute(schema.grants.insert().values(**row))

    def grants_for_model(self, model: str, include_revoked: bool, identities: Sequence[str]) -> list[GrantRecord]:
        query = select(schema.grants).where(schema.grants.c.model == model, schema.grants.c.identity.in_(identities))
        if not include_revoked:
            query = query.where(schema.grants.c.revoked_at.is_(None))
        query = query.order_by(schema.grants.c.created_at.desc(), schema.grants.c.grant_id)
        return [_grant(row) for row in self.conn.execute(query)]

    def revoke_grant(self, grant_id: str, at: int, reason: str) -> None:
        self.conn.execute(
            update(schema.grants)
            .where(schema.grants.c.grant_id == grant_id)
            .values(revoked_at=at, revoke_reason=reason)
        )

    def grant_hosts(self, grant_id: str) -> set[str]:
        query = select(schema.grant_hosts.c.host).where(schema.grant_hosts.c.grant_id == grant_id)
        return {host for (host,) in self.conn.execute(query)}

    def record_release(self, lease: LeaseRecord, new_host: bool) -> None:
        self.conn.execute(schema.leases.insert().values(**asdict(lease)))
        self.conn.execute(
            update(schema.grants)
            .where(schema.grants.c.grant_id == lease.grant_id)
            .values(releases=schema.grants.c.releases + 1)
        )
        if new_host:
            self.conn.execute(
                schema.grant_hosts.insert().values(grant_id=lease.grant_id, host=lease.host, first_seen=lease.issued_at)
            )

    def add_challenge(self, challenge: ChallengeRecord) -> None:
        self.conn.execute(schema.challenges.insert().values(**asdict(challenge)))

    def purge_challenges(self, expired_before: int) -> None:
        self.conn.execute(delete(schema.challenges).where(schema.challenges.c.expires_at < expired_before))

    def challenge(self, nonce: str) -> ChallengeRecord | None:
        row = self.conn.execute(select(schema.challenges).where(schema.challenges.c.nonce == nonce)).first()
        return None if row is None else ChallengeRecord(row.nonce, row.host, row.key_id, row.expires_at, row.used_at)

    def usage_head(self, host: str, log: str) -> UsageHeadRecord | None:
        table = schema.usage_heads
        row = self.conn.execute(select(table).where(table.c.host == host, table.c.log == log)).first()
        if row is None:
            return None
        return UsageHeadRecord(
            row.host, row.log, row.key, row.seq, row.digest, row.at, row.reported_at, row.current_at,
            json.loads(row.totals),
        )

    def put_usage_head(self, head: UsageHeadRecord) -> None:
        self.reset_usage_head(head.host, head.log)
        self.conn.execute(schema.usage_heads.insert().values(**{**asdict(head), "totals": json.dumps(head.totals)}))

    def reset_usage_head(self, host: str, log: str | None) -> int:
        table = schema.usage_heads
        query = delete(table).where(table.c.host == host)
        if log is not None:
            query = query.where(table.c.log == log)
        return int(self.conn.execute(query).rowcount)

    def leased(self, host: str, key_id: str, grant_id: str, at: int, slack: int) -> bool:
        leases = schema.leases
        query = select(leases.c.lease_id).where(
            leases.c.grant_id == grant_id, leases.c.host == host, leases.c.key_id == key_id,
            leases.c.issued_at <= at + slack, leases.c.expires_at >= at - slack,
        ).limit(1)  # fmt: skip
        return self.conn.execute(query).first() is not None

    def add_usage(self, rows: list[UsageRecord]) -> int:
        table = schema.usage
        by_host: dict[str, set[str]] = {}
        for r in rows:
            by_host.setdefault(r.host, set()).add(r.digest)
        known = {
            (host, digest)
            for host, digests in by_host.items()
            for (digest,) in self.conn.execute(
                select(table.c.digest).where(table.c.host == host, table.c.digest.in_(sorted(digests)))
            )
        }
        values = [
            {"host": r.host, "digest": r.digest, "seq": r.seq, "at": r.at, "grant_id": r.grant_id, "model": r.model,
             **r.usage.to_json()}
            for r in rows if (r.host, r.digest) not in known
        ]  # fmt: skip
        if values:
            self.conn.execute(table.insert(), values)
        return len(values)

    def usage_of(self, grant_id: str, since: int) -> Usage:
        table = schema.usage
        sums = [func.coalesce(func.sum(table.c[m]), 0) for m in METRICS]
        row = self.conn.execute(select(*sums).where(table.c.grant_id == grant_id, table.c.at >= since)).one()
        return Usage(*(int(v) for v in row))

    def append_audit(self, event: dict[str, Any]) -> AuditEntry:
        entry = auditchain.next_entry(self.head, event)
        self.conn.execute(schema.audit.insert().values(**entry.to_json()))
        self.conn.execute(
            update(schema.audit_head).where(schema.audit_head.c.id == 1).values(seq=entry.seq, hash=entry.hash)
        )
        self.head = (entry.seq, entry.hash)
        return entry


class SqlStore:
    """:class:`~modelseal.keyserver.store.Store` on an engine from :func:`~modelseal.keyserver.sqlstore.db.connect`
    (its schema migrated: :func:`open_store`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise StoreUnavailableError(f"the key-service database failed: {db.first_line(exc.orig)}") from None

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        try:
            with self.engine.begin() as conn:
                yield SqlTransaction(conn)
        except OperationalError as exc:  # lock wait timed out, connection lost: 503 unavailable, no traceback
            raise StoreUnavailableError(f"the key-service database failed: {db.first_line(exc.orig)}") from None

    def models(self) -> list[ModelSummary]:
        counts = select(schema.keys.c.model, func.count().label("n")).group_by(schema.keys.c.model).subquery()
        query = (
            select(schema.models, func.coalesce(counts.c.n, 0).label("keys"))
            .outerjoin(counts, counts.c.model == schema.models.c.name)
            .order_by(schema.models.c.name)
        )
        with self.engine.connect() as conn:
            return [ModelSummary(r.name, r.description, r.created_at, r.keys) for r in conn.execute(query)]

    def grants(self, model: str | None = None) -> list[GrantUse]:
        query = select(schema.grants).order_by(schema.grants.c.created_at, schema.grants.c.grant_id)
        if model:
            query = query.where(schema.grants.c.model == model)
        with self.engine.connect() as conn:
            counts = select(schema.grant_hosts.c.grant_id, func.count()).group_by(schema.grant_hosts.c.grant_id)
            hosts: dict[str, int] = {grant_id: n for grant_id, n in conn.execute(counts)}
            return [GrantUse(_grant(r), hosts.get(r.grant_id, 0)) for r in conn.execute(query)]

    def live_grants(self, identities: Sequence[str]) -> list[GrantRecord]:
        grants = schema.grants
        query = select(grants).where(grants.c.revoked_at.is_(None), grants.c.identity.in_(identities))
        with self._reading(), self.engine.connect() as conn:
            return [_grant(r) for r in conn.execute(query)]

    def keys_of(self, models: Iterable[str]) -> list[tuple[str, str]]:
        query = select(schema.keys.c.key_id, schema.keys.c.model).where(schema.keys.c.model.in_(list(models)))
        with self.engine.connect() as conn:
            return [(k, m) for k, m in conn.execute(query)]

    def key_grants(self, key_id: str, identities: Sequence[str]) -> tuple[str, list[GrantRecord]] | None:
        grants = schema.grants
        with self._reading(), self.engine.connect() as conn:
            model = conn.execute(select(schema.keys.c.model).where(schema.keys.c.key_id == key_id)).scalar()
            if model is None:
                return None
            live = select(grants).where(
                grants.c.model == model, grants.c.revoked_at.is_(None), grants.c.identity.in_(identities)
            )
            return model, [_grant(r) for r in conn.execute(live)]

    def audit_entries(self, after: int = 0, limit: int | None = None) -> list[AuditEntry]:
        with self.engine.connect() as conn:
            return read_audit(conn, after, limit)

    def usage_seq(self, host: str, log: str) -> int:
        table = schema.usage_heads
        with self._reading(), self.engine.connect() as conn:
            seq = conn.execute(select(table.c.seq).where(table.c.host == host, table.c.log == log)).scalar()
        return int(seq or 0)

    def usage_totals(
        self, since: int, until: int, period_s: int, grant_id: str | None = None, model: str | None = None
    ) -> list[UsageTotal]:
        table = schema.usage
        period = (table.c.at - table.c.at % period_s).label("period")
        query = (
            select(table.c.grant_id, table.c.model, period, *(func.sum(table.c[m]).label(m) for m in METRICS))
            .where(table.c.at >= since, table.c.at < until)
            .group_by(table.c.grant_id, table.c.model, period)
            .order_by(table.c.grant_id, period)
        )
        if grant_id:
            query = query.where(table.c.grant_id == grant_id)
        if model:
            query = query.where(table.c.model == model)
        with self._reading(), self.engine.connect() as conn:
            return [
                UsageTotal(r.grant_id, r.model, int(r.period), Usage(*(int(r._mapping[m]) for m in METRICS)))
                for r in conn.execute(query)
            ]

    def audit_head(self) -> tuple[int, str] | None:
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(schema.audit_head).where(schema.audit_head.c.id == 1)).one_or_none()
        except SQLAlchemyError:  # the table itself is gone (a tampered database)
            return None
        return None if row is None else (row.seq, row.hash)

    def describe(self) -> str:
        return self.engine.dialect.name  # sqlite or postgresql; never the URL (it may hold a password)

    def schema_revision(self) -> str:
        return db.revision(self.engine) or ""

    def close(self) -> None:
        self.engine.dispose()
