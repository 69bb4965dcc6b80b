"""session_artifacts; sessions' output schema and structured result

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 13:30:00

The files an ended session created or changed in its workspace (content within the
tenant's limits, else the reason it was left out), and the structured result of a session
asked for one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("output_schema", sa.Text(), nullable=True))
        batch.add_column(sa.Column("structured_result", sa.JSON(), nullable=True))
    op.create_table(
        "session_artifacts",
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=True),
        sa.Column("omitted_reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("session_id", "path"),
    )


def downgrade() -> None:
    op.drop_table("session_artifacts")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("structured_result")
        batch.drop_column("output_schema")
