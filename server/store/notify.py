"""PostgreSQL LISTEN/NOTIFY: how one replica tells the others something at once.

`notify` sends in the caller's transaction, so the message goes out at its commit, never
for a change rolled back. `Listener` holds one connection of its own for all its channels
and reconnects after an outage; whatever it missed meanwhile, its users must find in the
tables (notifications are hints, the database stays the truth). On SQLite (one server)
`notify` does nothing and no Listener runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

log = logging.getLogger(__name__)

# A session was asked to stop by a replica that does not run it (payload: its id).
CANCEL_CHANNEL = "agentplane_cancel"
# A session's events up to a number were committed (payload: "<session id> <seq>").
EVENTS_CHANNEL = "agentplane_events"


async def notify(db: DbSession, channel: str, payload: str) -> None:
    """NOTIFY `channel` with `payload` at the commit of `db`'s transaction (PostgreSQL)."""
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(text("SELECT pg_notify(:channel, :payload)"),
                         {"channel": channel, "payload": payload})


class Listener:
    """LISTENs on its channels and hands each payload to that channel's handler, until
    cancelled. Handlers run on the event loop and must not block or raise."""

    def __init__(
        self, url: URL, handlers: Mapping[str, Callable[[str], None]],
        *, retry_s: float = 1.0,
    ) -> None:
        # psycopg's own connection string: the URL without SQLAlchemy's driver name.
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._handlers = dict(handlers)
        self._retry_s = retry_s
        self.listening = asyncio.Event()  # set while subscribed
        # Called each time the subscription (re)starts: what was sent while it was down
        # is lost, so users re-read the tables.
        self.on_listening: list[Callable[[], None]] = []

    async def run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    for channel in self._handlers:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.listening.set()
                    for callback in self.on_listening:
                        callback()
                    async for message in conn.notifies():
                        handler = self._handlers.get(message.channel)
                        if handler is not None:
                            handler(message.payload)
            except psycopg.OperationalError as exc:
                log.warning("listen: database unavailable (%s); retrying", type(exc).__name__)
            finally:
                self.listening.clear()
            await asyncio.sleep(self._retry_s)
