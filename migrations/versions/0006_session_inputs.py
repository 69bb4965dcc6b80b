"""session_inputs: what running sessions ask their callers; sessions' caller tools

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 13:10:00

A session's requests to its caller (caller tool calls, approvals, questions) and their
answers: Respond on any replica settles a row, and the session's owner reads it. The
sessions table keeps the names of the caller tools and the approval patterns.
"""

from __future__ import annotations

import agentplane.server.store.types
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("caller_tools", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("require_approval", sa.JSON(), nullable=True))
    op.create_table(
        "session_inputs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("tool_name", sa.String(length=128), nullable=False),
        sa.Column("tool_use_id", sa.String(length=128), nullable=False),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column(
            "created_at", agentplane.server.store.types.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "deadline", agentplane.server.store.types.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "resolved_at", agentplane.server.store.types.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("decided_by", sa.String(length=16), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("answer", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_session_inputs_session", "session_inputs", ["session_id", "resolved_at"])


def downgrade() -> None:
    op.drop_index("ix_session_inputs_session", table_name="session_inputs")
    op.drop_table("session_inputs")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("require_approval")
        batch.drop_column("caller_tools")
