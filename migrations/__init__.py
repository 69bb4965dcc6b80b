"""Alembic migrations of agentplane's database (installed as agentplane.server.migrations)."""
