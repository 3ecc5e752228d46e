"""What the key service keeps, and the one shape every storage backend gives it: :class:`Store`.

:class:`~modelseal.keyserver.service.KeyService` makes every decision; a store only keeps records and
answers lookups, in the service's own terms (models, wrapped keys, grants and the hosts using them,
challenges, leases, the audit chain). Backends: :mod:`modelseal.keyserver.sqlstore` (SQLite embedded,
PostgreSQL for replicas) and :mod:`modelseal.keyserver.memstore` (in-process, for tests and tools).
A new backend is one module, ``keyserver/<name>store.py``, implementing these two protocols, plus one
registration: a line in :data:`BUILTIN` or an entry point in :data:`ENTRY_POINT_GROUP` named by its URL
scheme; :func:`open_store` picks it from ``[database] url``.

The guarantees a backend owes the service (the service relies on them, it cannot check them):

- :meth:`Store.transaction` is one unit of work. It locks the audit-chain head on entry, so writers
  across every process sharing the store run one at a time and each audit entry links to the one
  before; it commits when the block ends normally and rolls back everything when it raises. The
  service audits a refusal inside the same block and lets it end normally, so the refusal's record
  and its side effects (a spent nonce) commit together.
- Spent nonces: the service issues stateless nonces (:mod:`modelseal.keyserver.challenges`) and records
  each one when a release spends it (:meth:`Transaction.add_challenge`), in the release's transaction,
  whose head lock makes "not recorded yet, so record it" atomic across processes: of two transactions
  spending one nonce, one wins.
- Reads outside a transaction (:meth:`Store.models` ...) see only committed state.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

from modelseal.errors import UsageError, one_line
from modelseal.release.terms import Usage


@dataclass(frozen=True)
class ModelRecord:
    name: str
    description: str
    created_at: int


@dataclass(frozen=True)
class ModelSummary:
    """A model as ``GET /v1/admin/models`` lists it (field order is the JSON's)."""

    name: str
    description: str
    created_at: int
    keys: int


@dataclass(frozen=True)
class KeyRecord:
    """A data key, only ever wrapped by the master key (``wrap_version`` names the master-key version)."""

    key_id: str
    model: str
    wrapped: bytes
    wrap_version: str
    created_at: int


@dataclass(frozen=True)
class GrantRecord:
    """A grant: ``identity`` (canonical, :mod:`modelseal.keyserver.identity`) may use ``model``'s keys.

    ``evidence`` holds the requirements as their verifiers completed them; field order is the admin API's."""

    grant_id: str
    model: str
    identity: str
    not_before: int | None
    not_after: int | None
    max_hosts: int | None
    max_releases: int | None
    releases: int
    policy: str | None
    grace_s: int
    created_at: int
    evidence: list[dict[str, Any]]
    revoked_at: int | None = None
    revoke_reason: str | None = None
    terms: dict[str, Any] = field(default_factory=dict)  # licence terms (modelseal.release.terms.Terms JSON)


@dataclass(frozen=True)
class ChallengeRecord:
    """A nonce a release spent (issued to ``host`` for ``key_id``, valid until ``expires_at``)."""

    nonce: str
    host: str
    key_id: str
    expires_at: int
    used_at: int | None = None


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    grant_id: str
    key_id: str
    host: str
    issued_at: int
    expires_at: int


@dataclass(frozen=True)
class UsageHeadRecord:
    """Where one usage log of a host stands at the key service (:mod:`modelseal.release.usage`): its pinned
    public key, the last accepted entry, when the host last proved its head (``reported_at``), since when
    its reports have left entries behind (``current_at``: the last report that left none), running totals.
    A host has one log per agent (``log``: the id its first entry names)."""

    host: str
    log: str
    key: str
    seq: int
    digest: str
    at: int
    reported_at: int
    current_at: int
    totals: dict[str, dict[str, int]]


@dataclass(frozen=True)
class UsageRecord:
    """One accepted usage entry: ``host``'s entry ``seq`` (hash ``digest``), dated ``at`` (host clock, bounded
    by the service). An entry is counted once: the same ``(host, digest)`` again (a log resent from its
    start after the owner reset the host's chain) adds nothing."""

    host: str
    digest: str
    seq: int
    at: int
    grant_id: str
    model: str
    usage: Usage


@dataclass(frozen=True)
class UsageTotal:
    """A usage report row: one grant's counts in the period starting at ``period_start``."""

    grant_id: str
    model: str
    period_start: int
    usage: Usage


@dataclass(frozen=True)
class AuditEntry:
    """One link of the audit chain (:mod:`modelseal.keyserver.auditchain`); field order is the export's."""

    seq: int
    ts_ms: int
    entry: str
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GrantUse:
    """A grant with how many distinct hosts have used it."""

    grant: GrantRecord
    hosts: int


class Transaction(Protocol):
    """One unit of work inside :meth:`Store.transaction` (the audit head is locked for its whole life)."""

    # models and keys
    def has_model(self, name: str) -> bool: ...

    def add_model(self, model: ModelRecord) -> None: ...

    def key(self, key_id: str) -> KeyRecord | None: ...

    def add_key(self, key: KeyRecord) -> None: ...

    def keys(self) -> list[KeyRecord]: ...

    def rewrap_key(self, key_id: str, wrapped: bytes, wrap_version: str) -> None: ...

    # grants
    def grant(self, grant_id: str) -> GrantRecord | None: ...

    def add_grant(self, grant: GrantRecord) -> None: ...

    def grants_for_model(self, model: str, include_revoked: bool, identities: Sequence[str]) -> list[GrantRecord]:
        """The model's grants naming one of ``identities`` (:func:`~modelseal.keyserver.identity.naming`),
        newest first (ties: by grant id); revoked ones only if asked."""
        ...

    def revoke_grant(self, grant_id: str, at: int, reason: str) -> None:
        """Mark the grant revoked (the caller checked it exists and is not revoked yet)."""
        ...

    def grant_hosts(self, grant_id: str) -> set[str]:
        """The key hashes (``spki:...``) of every host that has used the grant."""
        ...

    def record_release(self, lease: LeaseRecord, new_host: bool) -> None:
        """Store the lease, count one release on its grant, and remember a new host (first seen at issue)."""
        ...

    # challenges
    def add_challenge(self, challenge: ChallengeRecord) -> None:
        """Record a spent nonce (``used_at`` set)."""
        ...

    def purge_challenges(self, expired_before: int) -> None:
        """Forget challenges that expired before this time (spent or not)."""
        ...

    def challenge(self, nonce: str) -> ChallengeRecord | None: ...

    # usage
    def usage_head(self, host: str, log: str) -> UsageHeadRecord | None: ...

    def put_usage_head(self, head: UsageHeadRecord) -> None:
        """Insert or replace the head of the host's log."""
        ...

    def reset_usage_head(self, host: str, log: str | None) -> int:
        """Forget the head of one log of the host (all of them: ``log`` None); how many were forgotten."""
        ...

    def leased(self, host: str, key_id: str, grant_id: str, at: int, slack: int) -> bool:
        """Whether the grant leased the key to the host for a time within ``slack`` seconds of ``at``."""
        ...

    def add_usage(self, rows: list[UsageRecord]) -> int:
        """Store the rows not stored yet (by host and digest); return how many were new."""
        ...

    def usage_of(self, grant_id: str, since: int) -> Usage:
        """The grant's usage over every host, from entries dated ``since`` or later."""
        ...

    # audit
    def append_audit(self, event: dict[str, Any]) -> AuditEntry:
        """Chain ``event`` after the locked head (:func:`modelseal.keyserver.auditchain.next_entry`),
        store it and move the head to it."""
        ...


class Store(Protocol):
    """Where the key service keeps its state; reads outside :meth:`transaction` see committed state."""

    def transaction(self) -> AbstractContextManager[Transaction]:
        """Lock the audit head, yield the unit of work; commit on normal exit, roll back on an exception."""
        ...

    def models(self) -> list[ModelSummary]:
        """Every model with its number of keys, by name."""
        ...

    def grants(self, model: str | None = None) -> list[GrantUse]:
        """Grants (of one model, or all) oldest first (ties: by grant id), with their host counts."""
        ...

    def live_grants(self, identities: Sequence[str]) -> list[GrantRecord]:
        """Every grant not revoked that names one of ``identities``."""
        ...

    def keys_of(self, models: Iterable[str]) -> list[tuple[str, str]]:
        """``(key_id, model)`` of every key of these models."""
        ...

    def key_grants(self, key_id: str, identities: Sequence[str]) -> tuple[str, list[GrantRecord]] | None:
        """The model of key ``key_id`` and its grants not revoked that name one of ``identities``, or None
        for an unknown key (one read: what a challenge needs, without a transaction)."""
        ...

    def audit_entries(self, after: int = 0, limit: int | None = None) -> list[AuditEntry]:
        """Audit entries with ``seq > after``, in order, at most ``limit``."""
        ...

    def usage_seq(self, host: str, log: str) -> int:
        """The last entry of ``host``'s usage log ``log`` accepted (0: none): what a challenge tells its agent."""
        ...

    def usage_totals(
        self, since: int, until: int, period_s: int, grant_id: str | None = None, model: str | None = None
    ) -> list[UsageTotal]:
        """Usage per grant per period (``period_s`` windows aligned to the epoch) of entries dated in
        ``[since, until)``, by grant then period."""
        ...

    def audit_head(self) -> tuple[int, str] | None:
        """The chain head the store recorded with its last append (``(0, GENESIS)`` before any), or None
        when the record is gone: what a verifier compares the entries' end with, so a cut tail shows."""
        ...

    def describe(self) -> str:
        """What this store is, for the start-up log line (``sqlite``, ``postgresql``, ...); no secrets."""
        ...

    def schema_revision(self) -> str:
        """The revision of the stored schema (``keyserver init`` and ``migrate`` print it)."""
        ...

    def close(self) -> None:
        """Release connections (the store is not used afterwards)."""
        ...


StoreOpener = Callable[[str, bool], Store]
"""``opener(url, migrate)``: connect to ``url``, bring its schema up to date if ``migrate``, or refuse."""

ENTRY_POINT_GROUP = "modelseal.keyserver.stores"
"""Entry points in this group are named by a URL scheme and point at a :data:`StoreOpener`."""

# The built-in backends by URL scheme (``sqlite+pysqlite://`` counts as ``sqlite``); a bare path is SQLite.
BUILTIN = {
    "sqlite": "modelseal.keyserver.sqlstore.store:open_store",
    "postgresql": "modelseal.keyserver.sqlstore.store:open_store",
    "postgres": "modelseal.keyserver.sqlstore.store:open_store",
}


def url_scheme(url: str) -> str:
    """The backend a ``[database] url`` asks for: its scheme without a driver (``postgresql+psycopg``)."""
    if "://" not in url:
        return "sqlite"
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def open_store(url: str, migrate: bool = True) -> Store:
    """The store ``url`` names: a built-in backend, or one installed under :data:`ENTRY_POINT_GROUP`.

    Adding a backend is one module implementing :class:`Store` plus that one entry point; nothing here
    changes. The service itself never learns which backend it runs on.
    """
    scheme = url_scheme(url)
    target = BUILTIN.get(scheme)
    if target is not None:
        opener: StoreOpener = pkgutil.resolve_name(target)
    else:
        found = list(entry_points(group=ENTRY_POINT_GROUP, name=scheme))
        if not found:
            installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} - set(BUILTIN))
            known = ", ".join([*BUILTIN, *installed])
            raise UsageError(f"no key-service store for {scheme}:// database URLs (known: {known})")
        if len(found) > 1:  # which one the keys would go to must not depend on installation order
            both = " and ".join(sorted(f"{ep.value} of {ep.dist.name if ep.dist else '?'}" for ep in found))
            raise UsageError(f"{scheme}:// database URLs have more than one key-service store installed: {both}")
        (point,) = found
        try:
            opener = point.load()
        except Exception as exc:  # a broken plugin is named in one line, never a traceback
            failure = one_line(exc)
            raise UsageError(f"key-service store plugin {scheme} ({point.value}) cannot be loaded: {failure}") from None
    return opener(url, migrate)
