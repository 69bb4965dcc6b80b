"""sessions: paused at the budget

Revision ID: 0013
Revises: 0010
Create Date: 2027-01-20 10:00:00

A running session paused at its budget (a model request held until its budget is
raised): why, since when, until when, and a raise the day's window could not cover yet.
All NULL while it is not paused.
"""

from __future__ import annotations

import sqlalchemy as sa
from agentplane.server.store.types import Money, UTCDateTime
from alembic import op

revision = "0013"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("pause_reason", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("paused_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("pause_deadline", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("pending_budget_usd", Money(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("pending_budget_usd")
        batch.drop_column("pause_deadline")
        batch.drop_column("paused_at")
        batch.drop_column("pause_reason")
