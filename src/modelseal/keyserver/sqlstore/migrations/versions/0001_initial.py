"""Initial key-service schema: models, wrapped keys, grants, challenges, leases, hash-chained audit log.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    big, txt = sa.BigInteger, sa.Text
    op.create_table(
        "models",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("description", txt, nullable=False),
        sa.Column("created_at", big, nullable=False),
    )
    op.create_table(
        "keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), nullable=False, index=True),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("wrap_version", sa.String(64), nullable=False),
        sa.Column("created_at", big, nullable=False),
    )
    op.create_table(
        "grants",
        sa.Column("grant_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), nullable=False, index=True),
        sa.Column("identity", sa.String(500), nullable=False),
        *(sa.Column(c, big) for c in ("not_before", "not_after")),
        *(sa.Column(c, sa.Integer) for c in ("max_hosts", "max_releases")),
        sa.Column("releases", sa.Integer, nullable=False),
        sa.Column("policy", txt),
        sa.Column("evidence", txt, nullable=False),
        sa.Column("grace_s", sa.Integer, nullable=False),
        sa.Column("created_at", big, nullable=False),
        sa.Column("revoked_at", big),
        sa.Column("revoke_reason", txt),
    )
    op.create_table(
        "grant_hosts",
        sa.Column("grant_id", sa.String(64), sa.ForeignKey("grants.grant_id"), primary_key=True),
        sa.Column("host", sa.String(100), primary_key=True),
        sa.Column("first_seen", big, nullable=False),
    )
    op.create_table(
        "challenges",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(100), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("expires_at", big, nullable=False, index=True),
        sa.Column("used_at", big),
    )
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.String(64), primary_key=True),
        sa.Column("grant_id", sa.String(64), sa.ForeignKey("grants.grant_id"), nullable=False, index=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(100), nullable=False),
        sa.Column("issued_at", big, nullable=False),
        sa.Column("expires_at", big, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("seq", big, primary_key=True, autoincrement=False),
        sa.Column("ts_ms", big, nullable=False),
        sa.Column("entry", txt, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", big, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS}])


def downgrade() -> None:
    for name in ("audit_head", "audit", "leases", "challenges", "grant_hosts", "grants", "keys", "models"):
        op.drop_table(name)
