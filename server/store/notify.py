"""PostgreSQL LISTEN/NOTIFY: how one replica tells the others something at once.

`notify` sends in the caller's transaction, so the message goes out at its commit, never
for a change rolled back. `Listener` holds one connection of its own per channel and
reconnects after an outage; whatever it missed meanwhile, its users must find in the
tables (notifications are hints, the database stays the truth). On SQLite (one server)
both do nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

log = logging.getLogger(__name__)

# A session was asked to stop by a replica that does not run it (payload: its id).
CANCEL_CHANNEL = "agentplane_cancel"


async def notify(db: DbSession, channel: str, payload: str) -> None:
    """NOTIFY `channel` with `payload` at the commit of `db`'s transaction (PostgreSQL)."""
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(text("SELECT pg_notify(:channel, :payload)"),
                         {"channel": channel, "payload": payload})


class Listener:
    """LISTENs on one channel and hands each payload to `on_message`, until cancelled."""

    def __init__(self, url: URL, channel: str, on_message: Callable[[str], None],
                 *, retry_s: float = 1.0) -> None:
        # psycopg's own connection string: the URL without SQLAlchemy's driver name.
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._channel = channel
        self._on_message = on_message
        self._retry_s = retry_s
        self.listening = asyncio.Event()  # set while subscribed (tests wait for it)

    async def run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self.listening.set()
                    async for message in conn.notifies():
                        self._on_message(message.payload)
            except psycopg.OperationalError as exc:
                log.warning("listen %s: database unavailable (%s); retrying",
                            self._channel, type(exc).__name__)
            finally:
                self.listening.clear()
            await asyncio.sleep(self._retry_s)
