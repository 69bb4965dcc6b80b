"""Notifications of committed changes: how a replica tells itself and the others at once.

`notify` sends in the caller's transaction, so the message goes out at its commit, never
for a change rolled back: to this process's `Bus` (any database), and on PostgreSQL by
NOTIFY to every replica, whose `Listener` hands it to their buses. A Listener holds one
connection of its own and reconnects after an outage; whatever it missed meanwhile, its
users must find in the tables (notifications are hints, the database stays the truth).
Handlers may thus be told of one change twice (at the commit here, and by the Listener).
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

from ..telemetry.recurring import RecurringProblem
from .outages import cause

log = logging.getLogger(__name__)

# A session was asked to stop by a replica that does not run it (payload: its id).
CANCEL_CHANNEL = "agentplane_cancel"
# A session's events up to a number were committed (payload: "<session id> <seq>").
EVENTS_CHANNEL = "agentplane_events"
# A budget window's spent or reserved dollars changed (payload: "<tenant> <day>").
BUDGET_CHANNEL = "agentplane_budget"
# A session's input request was answered (payload: "<session id> <request id>").
INPUTS_CHANNEL = "agentplane_inputs"
# A session was deleted (payload: its id): every replica forgets it.
DELETED_CHANNEL = "agentplane_deleted"

# Keys of a store session's `info`: its bus, and what it notified in its transaction.
BUS = "agentplane.bus"
_PENDING = "agentplane.notified"


class Bus:
    """This process's handlers of each channel. Handlers run on the event loop and must
    not block or raise."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Callable[[str], None]]] = {}
        self._resumed: list[Callable[[], None]] = []
        # Whether every change reaches this bus now. With one server (SQLite) all changes
        # are its own; replicas need their Listener subscribed (it sets this).
        self.hears_all: Callable[[], bool] = lambda: True

    @property
    def channels(self) -> list[str]:
        return list(self._handlers)

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        self._handlers.setdefault(channel, []).append(handler)

    def deliver(self, channel: str, payload: str) -> None:
        for handler in self._handlers.get(channel, ()):
            handler(payload)

    def on_resume(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the bus hears all again after a gap (it may have missed
        changes meanwhile: re-read the tables)."""
        self._resumed.append(callback)

    def resumed(self) -> None:
        for callback in self._resumed:
            callback()


async def notify(db: DbSession, channel: str, payload: str) -> None:
    """Tell `channel` `payload` at the commit of `db`'s transaction."""
    db.sync_session.info.setdefault(_PENDING, []).append((channel, payload))
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
        )


def committed(info: dict[str, object]) -> None:
    """A store session committed: deliver what it notified to its bus."""
    pending: list[tuple[str, str]] = info.pop(_PENDING, None) or []  # type: ignore[assignment]
    bus = info.get(BUS)
    if isinstance(bus, Bus):
        for channel, payload in pending:
            bus.deliver(channel, payload)


def rolled_back(info: dict[str, object]) -> None:
    info.pop(_PENDING, None)


class Listener:
    """LISTENs on every channel of `bus` and delivers each notification to it, until
    cancelled."""

    def __init__(self, url: URL, bus: Bus, *, retry_s: float = 1.0) -> None:
        # psycopg's own connection string: the URL without SQLAlchemy's driver name.
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._bus = bus
        self._retry_s = retry_s
        self.listening = asyncio.Event()  # set while subscribed
        bus.hears_all = self.listening.is_set

    async def run(self) -> None:
        # The cause once, then at growing intervals while it lasts (not every retry).
        problem = RecurringProblem(
            log, f"listen: database unavailable, retrying every {self._retry_s:g} s"
        )
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    for channel in self._bus.channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.listening.set()
                    problem.resolved()
                    self._bus.resumed()
                    async for message in conn.notifies():
                        self._bus.deliver(message.channel, message.payload)
            except psycopg.OperationalError as exc:
                problem.failed(cause(exc))
            finally:
                self.listening.clear()
            await asyncio.sleep(self._retry_s)
