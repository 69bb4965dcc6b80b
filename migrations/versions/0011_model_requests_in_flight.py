"""model_requests_in_flight; budget_windows.holds; reservations without a foreign key

Revision ID: 0011
Revises: 0010
Create Date: 2027-01-14 10:00:00

The metering gateway writes a request's pending record (with its estimate, the request's
reservation) before it forwards it; its settlement replaces it with the request's
`model_requests` row. Crash recovery charges a dead server's pending records at their
estimate, so kill -9 during a model request loses no spend.

Admission takes its hold in a short transaction of its own, before the session's row is
written: a reservation no longer refers to its session by a foreign key, and each window
counts its reservations still HELD (the tenant's active sessions admitted in it), which
the hold's one conditional UPDATE checks against max_concurrent_sessions. A hold keeps its
admission's request_id, unique per tenant: concurrent repeats of a request take one hold.
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

    with op.batch_alter_table("budget_windows") as batch:
        batch.add_column(sa.Column("holds", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE budget_windows SET holds = (SELECT count(*) FROM reservations r "
        "WHERE r.tenant = budget_windows.tenant AND r.day = budget_windows.day "
        "AND r.status = 'HELD')"
    )
    with op.batch_alter_table("reservations") as batch:
        batch.drop_constraint("fk_reservations_session_id_sessions", type_="foreignkey")
        batch.add_column(sa.Column("request_id", sa.String(length=64), nullable=True))
    op.create_index("ix_reservations_status_created", "reservations", ["status", "created_at"])
    op.create_index(
        "uq_reservations_tenant_request_id", "reservations", ["tenant", "request_id"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_reservations_tenant_request_id", table_name="reservations")
    op.drop_index("ix_reservations_status_created", table_name="reservations")
    op.execute("DELETE FROM reservations WHERE session_id NOT IN (SELECT id FROM sessions)")
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("request_id")
        batch.create_foreign_key(
            "fk_reservations_session_id_sessions",
            "sessions",
            ["session_id"],
            ["id"],
            ondelete="CASCADE",
        )
    with op.batch_alter_table("budget_windows") as batch:
        batch.drop_column("holds")
    op.drop_index("ix_model_requests_in_flight_session", table_name="model_requests_in_flight")
    op.drop_table("model_requests_in_flight")
