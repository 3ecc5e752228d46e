"""Licences: grant terms, each host's usage-log heads, accepted usage entries; grants indexed by identity.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.BigInteger
    with op.batch_alter_table("grants") as batch:  # batch mode: SQLite cannot add a NOT NULL column otherwise
        batch.add_column(sa.Column("terms", sa.Text, nullable=False, server_default="{}"))
    op.create_table(
        "usage_heads",
        sa.Column("host", sa.String(100), primary_key=True),
        sa.Column("log", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("seq", big, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("at", big, nullable=False),
        sa.Column("reported_at", big, nullable=False),
        sa.Column("current_at", big, nullable=False),
        sa.Column("totals", sa.Text, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("host", sa.String(100), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("seq", big, nullable=False),
        sa.Column("at", big, nullable=False),
        sa.Column("grant_id", sa.String(64), sa.ForeignKey("grants.grant_id"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        *(sa.Column(c, big, nullable=False) for c in ("requests", "items", "input_tokens", "output_tokens")),
    )
    op.create_index("usage_grant_at", "usage", ["grant_id", "at"])
    op.create_index("ix_grants_identity", "grants", ["identity"])  # a host's grants without a scan of all


def downgrade() -> None:
    op.drop_index("ix_grants_identity", table_name="grants")
    op.drop_index("usage_grant_at", table_name="usage")
    op.drop_table("usage")
    op.drop_table("usage_heads")
    with op.batch_alter_table("grants") as batch:
        batch.drop_column("terms")
