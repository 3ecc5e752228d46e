"""The key service's tables (SQLAlchemy Core). Migrations in ``migrations/`` create and evolve them.

Times are integer Unix seconds (audit timestamps: milliseconds) so SQLite and PostgreSQL agree.
Data keys are stored only wrapped by the master key (``keys.wrapped``), never in the clear.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

models = Table(
    "models",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("created_at", BigInteger, nullable=False),
)

keys = Table(
    "keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("model", String(200), ForeignKey("models.name"), nullable=False, index=True),
    Column("wrapped", LargeBinary, nullable=False),
    Column("wrap_version", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

grants = Table(
    "grants",
    metadata,
    Column("grant_id", String(64), primary_key=True),
    Column("model", String(200), ForeignKey("models.name"), nullable=False, index=True),
    Column("identity", String(500), nullable=False, index=True),  # grants are looked up by what names a host
    Column("not_before", BigInteger),
    Column("not_after", BigInteger),
    Column("max_hosts", Integer),
    Column("max_releases", Integer),
    Column("releases", Integer, nullable=False, default=0),
    Column("policy", Text),
    Column("evidence", Text, nullable=False, default="[]"),
    Column("grace_s", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
    Column("revoke_reason", Text),
    Column("terms", Text, nullable=False, default="{}"),  # licence terms, JSON (release/terms.py)
)

grant_hosts = Table(
    "grant_hosts",
    metadata,
    Column("grant_id", String(64), ForeignKey("grants.grant_id"), primary_key=True),
    Column("host", String(100), primary_key=True),
    Column("first_seen", BigInteger, nullable=False),
)

challenges = Table(
    "challenges",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("host", String(100), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("used_at", BigInteger),
)

leases = Table(
    "leases",
    metadata,
    Column("lease_id", String(64), primary_key=True),
    Column("grant_id", String(64), ForeignKey("grants.grant_id"), nullable=False, index=True),
    Column("key_id", String(64), nullable=False),
    Column("host", String(100), nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)

usage_heads = Table(
    "usage_heads",
    metadata,
    Column("host", String(100), primary_key=True),
    Column("log", String(64), primary_key=True),  # one chain per agent (the id its first entry names)
    Column("key", String(100), nullable=False),  # the usage log's Ed25519 public key, pinned at entry 1
    Column("seq", BigInteger, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("reported_at", BigInteger, nullable=False),
    Column("current_at", BigInteger, nullable=False),  # the last report that left no entry behind
    Column("totals", Text, nullable=False),  # JSON: grant id -> running totals
)

usage = Table(
    "usage",
    metadata,
    Column("host", String(100), primary_key=True),
    Column("digest", String(64), primary_key=True),  # the entry's hash: counted once per host
    Column("seq", BigInteger, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("grant_id", String(64), ForeignKey("grants.grant_id"), nullable=False),
    Column("model", String(200), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("items", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Index("usage_grant_at", "grant_id", "at"),
)

audit = Table(
    "audit",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("entry", Text, nullable=False),  # canonical JSON of the event
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)
