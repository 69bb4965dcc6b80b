"""sessions: the trace a session was admitted in

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-05 10:00:00

The trace id and the RunSession span id of the call that admitted a session (hex; NULL
when it was not traced), so that later calls about the session (StreamSession,
GetSession, Respond, CancelSession, on any replica) link to its trace, and GetSession
returns it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("trace_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("trace_span_id", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("trace_span_id")
        batch.drop_column("trace_id")
