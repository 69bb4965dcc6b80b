"""model_requests: each metered model request, written as it settles

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 00:40:00

The audit trail of what the metering gateway charged, per request; crash recovery closes
an interrupted session at the sum of its requests, which each write also adds to the
session's running totals.
"""

from __future__ import annotations

import agentplane.server.store.types
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_requests",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column(
            "started_at", agentplane.server.store.types.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "ended_at", agentplane.server.store.types.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_creation_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_read_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", agentplane.server.store.types.Money(), nullable=False),
        sa.Column("price_version", sa.String(length=32), nullable=False),
        sa.Column("upstream_request_id", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_model_requests_session", "model_requests", ["session_id"])
    op.create_index("ix_model_requests_tenant_time", "model_requests", ["tenant", "ended_at"])


def downgrade() -> None:
    op.drop_index("ix_model_requests_tenant_time", table_name="model_requests")
    op.drop_index("ix_model_requests_session", table_name="model_requests")
    op.drop_table("model_requests")
