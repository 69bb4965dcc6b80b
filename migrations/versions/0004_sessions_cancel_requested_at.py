"""sessions.cancel_requested_at: a cancel that reached a replica not running the session

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 00:30:00

CancelSession on any replica flags the session here (and NOTIFYs its owner on
PostgreSQL); the owner also finds the flag at its next lease renewal.
"""

from __future__ import annotations

import agentplane.server.store.types
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(
            sa.Column(
                "cancel_requested_at",
                agentplane.server.store.types.UTCDateTime(timezone=True),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("cancel_requested_at")
