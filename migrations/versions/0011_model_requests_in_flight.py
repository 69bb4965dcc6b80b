"""model_requests_in_flight: the model requests forwarded and not yet settled

Revision ID: 0011
Revises: 0010
Create Date: 2027-01-14 10:00:00

The metering gateway writes a request's pending record (with its estimate, the request's
reservation) before it forwards it; its settlement replaces it with the request's
`model_requests` row. Crash recovery charges a dead server's pending records at their
estimate, so kill -9 during a model request loses no spend.
"""

from __future__ import annotations

import agentplane.server.store.types
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_requests_in_flight",
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("estimate_usd", agentplane.server.store.types.Money(), nullable=False),
        sa.Column(
            "started_at", agentplane.server.store.types.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("replica", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index(
        "ix_model_requests_in_flight_session", "model_requests_in_flight", ["session_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_model_requests_in_flight_session", table_name="model_requests_in_flight")
    op.drop_table("model_requests_in_flight")
