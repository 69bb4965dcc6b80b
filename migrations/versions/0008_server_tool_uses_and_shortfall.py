"""server-tool uses of model requests and sessions; sessions' metering shortfall

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 12:00:00

Each metered request records the server-side tool uses upstream billed it for (web
searches, ...), each session their sum, and how far its metered cost fell short of the
CLI's own count when it did (0 otherwise).
"""

from __future__ import annotations

import agentplane.server.store.types
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_requests") as batch:
        batch.add_column(sa.Column("server_tool_use", sa.JSON(), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("server_tool_use", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column(
                "shortfall_usd",
                agentplane.server.store.types.Money(),
                nullable=False,
                server_default="0",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("shortfall_usd")
        batch.drop_column("server_tool_use")
    with op.batch_alter_table("model_requests") as batch:
        batch.drop_column("server_tool_use")
