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
import uuid
from collections.abc import Callable

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..errors import DatabaseUnavailable
from .app_names import application_name
from .outages import cause

# A session was asked to stop by a replica that does not run it (payload: its id).
CANCEL_CHANNEL = "agentplane_cancel"
# A session's events up to a number were committed (payload: "<session id> <seq>").
EVENTS_CHANNEL = "agentplane_events"
# A budget window's spent or reserved dollars changed (payload: "<tenant> <day>").
BUDGET_CHANNEL = "agentplane_budget"
# A session's input request was answered (payload: "<session id> <request id>").
INPUTS_CHANNEL = "agentplane_inputs"
# A session's budget was raised, or a raise of it waits for the day's window (payload: its
# id): its owner reads it and applies it (a paused session goes on).
SESSION_BUDGET_CHANNEL = "agentplane_session_budget"
# A session was deleted (payload: its id): every replica forgets it.
DELETED_CHANNEL = "agentplane_deleted"

# How long a new LISTEN connection waits to hear its own NOTIFY: a session of its own
# hears it within milliseconds, one through a transaction pooler never.
SELF_CHECK_S = 10.0
# The longest wait between attempts to (re)connect it.
MAX_RETRY_S = 2.0
_LISTEN_PARAMS: dict[str, str | int] = {
    "application_name": application_name("listen"),
    "connect_timeout": 10,  # a host that drops packets does not hold up readiness's verdict
    # The connection is silent while nothing is notified: TCP keepalives find a peer that
    # vanished (a host or network gone) within about a minute, not hours.
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

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
    cancelled; reconnects after an outage.

    With `notify_through` (the pools' engine) it proves at each (re)connect that it hears
    what the pools notify: it NOTIFYs itself through them and waits at most `check_s` to
    hear it. A connection that is no session of its own (one through PgBouncer in
    transaction mode, whose server connection serves others between transactions) never
    hears it. `status(detail)` is told each failed attempt (why, for the log: may name
    hosts) and each success after a failure (None: subscribed and proven); `describe`
    words a driver's error (default: `outages.cause`)."""

    def __init__(
        self,
        url: URL | str,
        bus: Bus,
        *,
        notify_through: AsyncEngine | None = None,
        status: Callable[[str | None], None] = lambda _: None,
        describe: Callable[[BaseException], str] = cause,
        retry_s: float = 1.0,
        check_s: float = SELF_CHECK_S,
    ) -> None:
        # psycopg's own connection string: the URL without SQLAlchemy's driver name.
        url = make_url(url) if isinstance(url, str) else url
        self._conninfo = make_conninfo(
            url.set(drivername="postgresql").render_as_string(hide_password=False),
            **_LISTEN_PARAMS,
        )
        self._bus = bus
        self._engine = notify_through
        self._status = status
        self._describe = describe
        self._retry_s = retry_s
        self._check_s = check_s
        # This listener's own channel, for its proof.
        self._ping_channel = f"agentplane_ping_{uuid.uuid4().hex[:16]}"
        self._reported: str | None = "not yet subscribed"
        self.listening = asyncio.Event()  # set while subscribed (and proven)
        self.tried = asyncio.Event()  # set once the first attempt has a verdict
        bus.hears_all = self.listening.is_set

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    channels = [*self._bus.channels, self._ping_channel]
                    for channel in channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    await self._prove(conn)
                    failures = 0
                    self.listening.set()
                    self._report(None)
                    self._bus.resumed()
                    async for message in conn.notifies():
                        if message.channel != self._ping_channel:
                            self._bus.deliver(message.channel, message.payload)
                    raise psycopg.OperationalError("the LISTEN connection closed")
            except NotHeard as exc:
                self._report(f"the LISTEN connection is not proven: {exc}")
            except (psycopg.Error, OSError) as exc:
                self._report(f"the LISTEN connection failed: {self._describe(exc)}")
            finally:
                self.listening.clear()
            failures += 1
            await asyncio.sleep(min(self._retry_s * 2 ** (failures - 1), MAX_RETRY_S))

    async def _prove(self, conn: psycopg.AsyncConnection[object]) -> None:
        """NOTIFY this listener's channel through the pools; return once it is heard
        (delivering what else arrives meanwhile), raise NotHeard after `check_s`."""
        if self._engine is None:
            return
        payload = uuid.uuid4().hex
        try:
            async with self._engine.begin() as db:
                await db.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": self._ping_channel, "payload": payload},
                )
        except (SQLAlchemyError, DatabaseUnavailable, OSError) as exc:
            # DatabaseUnavailable says what callers are told; the driver's words are its cause.
            driver = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else None
            why = self._describe(driver or exc)
            raise NotHeard(f"its check NOTIFY could not be sent: {why}") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._check_s
        while (left := deadline - loop.time()) > 0:
            async for message in conn.notifies(timeout=left):
                if message.channel != self._ping_channel:
                    self._bus.deliver(message.channel, message.payload)
                elif message.payload == payload:
                    return
        raise NotHeard(
            f"it did not hear its own NOTIFY within {self._check_s:g} s: "
            "it is not a database session of its own (does AGENTPLANE_DATABASE_LISTEN_URL, "
            "or AGENTPLANE_DATABASE_URL when it is unset, point at PgBouncer in transaction "
            "mode?); point AGENTPLANE_DATABASE_LISTEN_URL straight at PostgreSQL"
        )

    def _report(self, detail: str | None) -> None:
        """Tell `status` of a failure (each: its log backs off while the cause is the same)
        or of a success after failures."""
        if detail is not None or self._reported is not None:
            self._reported = detail
            self._status(detail)
        self.tried.set()


class NotHeard(Exception):
    """The LISTEN connection did not hear its own NOTIFY (in time, or at all)."""
