"""Alembic environment: runs on the connection agentplane hands it, or on
AGENTPLANE_DATABASE_URL when invoked through the `alembic` command."""

from __future__ import annotations

import asyncio
import os

from agentplane.server.store.engine import create_engine
from agentplane.server.store.models import Base
from alembic import context
from sqlalchemy.engine import Connection

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(url: str) -> None:
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(_run)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_online(os.environ.get("AGENTPLANE_DATABASE_URL", "sqlite:///agentplane.db")))
