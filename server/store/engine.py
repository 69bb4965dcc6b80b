"""The database engine: URL normalisation, SQLite pragmas, migrations, and outages.

Every session made by `sessionmaker` (and every read wrapped in `database_outages`) turns
an outage of the database into DatabaseUnavailable; other database errors (constraint
violations, conflicts, bugs) pass unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSessionTransaction,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from .. import migrations as _migrations  # type: ignore[attr-defined]  # top-level migrations/
from ..errors import DatabaseUnavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(_migrations.__file__).resolve().parent


def async_url(url: str) -> str:
    """Pick the async driver for a plain URL (sqlite -> aiosqlite, postgresql -> psycopg)."""
    parsed = make_url(url)
    drivers = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg"}
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets WAL, a busy timeout and foreign keys."""
    url = async_url(url)
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


# What callers are told; the driver's own message (which may name hosts) goes to the log.
UNREACHABLE = "the database is unreachable; retry later"
STORAGE = (
    "the database's storage cannot be opened or read (its file is missing, unreadable or "
    "not a database, or a disk failed); retry later"
)
READ_ONLY = "the database accepts no writes now (it is read-only); retry later"
NO_SCHEMA = (
    "the database lacks agentplane's tables (it was replaced, or never migrated with "
    "`agentplane-server migrate`); retry later"
)
EXHAUSTED = "the database is out of resources (connections, memory or disk); retry later"
NO_CONNECTION = "no database connection became free in time; retry later"

# SQLite primary result codes that mean "the database cannot serve now". Not among them:
# BUSY/LOCKED (contention: another writer, not an outage), CORRUPT (damaged data, which
# no retry cures: it stays INTERNAL and is logged with its traceback), constraint errors.
_SQLITE = {
    8: READ_ONLY,  # SQLITE_READONLY: a read-only file, or one moved away underneath us
    10: STORAGE,  # SQLITE_IOERR
    13: EXHAUSTED,  # SQLITE_FULL
    14: STORAGE,  # SQLITE_CANTOPEN: no file (or a directory) at the path, or no access
    26: STORAGE,  # SQLITE_NOTADB: the file was replaced by something else
}
# PostgreSQL SQLSTATEs (or their two-letter classes) that mean the same. Not among them:
# 40xxx (deadlock, serialization failure: conflicts), 57014 (a cancelled statement),
# XX (internal errors, corruption), the rest of 42 (a statement's syntax or access: bugs).
_SQLSTATES = {
    "08": UNREACHABLE,  # connection exceptions
    "53": EXHAUSTED,  # insufficient resources: disk full, out of memory, too many connections
    "57P01": UNREACHABLE,  # admin shutdown (pg_terminate_backend, a restart)
    "57P02": UNREACHABLE,  # crash shutdown
    "57P03": UNREACHABLE,  # cannot connect now (starting up, shutting down)
    "58030": STORAGE,  # I/O error
    "25006": READ_ONLY,  # a read-only transaction: a hot standby, e.g. after a failover
    "42P01": NO_SCHEMA,  # undefined table
}


def outage(exc: BaseException) -> str | None:
    """What to tell the caller when `exc` means the database cannot serve now, else None
    (IntegrityError in particular is never an outage: admission catches it)."""
    if isinstance(exc, sa_exc.TimeoutError):  # the pool had no connection to give
        return NO_CONNECTION
    if not isinstance(exc, sa_exc.DBAPIError) or isinstance(exc, sa_exc.IntegrityError):
        return None
    if exc.connection_invalidated:  # the dialect recognised a lost connection
        return UNREACHABLE
    orig = exc.orig
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int):
        primary = sqlite_code & 0xFF  # extended codes carry the primary in the low byte
        if primary == 1 and str(orig).startswith("no such table"):  # SQLITE_ERROR
            return NO_SCHEMA  # the file was replaced by an empty one (or never migrated)
        return _SQLITE.get(primary)
    if hasattr(orig, "sqlstate"):  # psycopg
        state: str | None = getattr(orig, "sqlstate", None)
        if state is None:  # raised by the client: refused, closed, lost mid-query
            return UNREACHABLE if isinstance(exc, sa_exc.OperationalError) else None
        return _SQLSTATES.get(state) or _SQLSTATES.get(state[:2])
    return None


def _unavailable(exc: BaseException) -> DatabaseUnavailable | None:
    message = outage(exc)
    if message is None:
        return None
    orig = getattr(exc, "orig", None) or exc
    # The driver's message, without SQLAlchemy's statement and parameters (never logged).
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    log.warning("database unavailable: %s: %s", type(orig).__name__, detail)
    return DatabaseUnavailable(message)


@contextmanager
def database_outages() -> Iterator[None]:
    """Re-raise an outage of the database as DatabaseUnavailable (the driver's error
    chained); any other exception passes unchanged. For work outside `sessionmaker`'s
    sessions, e.g. a read on a bare connection."""
    try:
        yield
    except Exception as exc:
        translated = _unavailable(exc)
        if translated is None:
            raise
        raise translated from exc


class _Transaction(AsyncSessionTransaction):
    """A session's transaction whose begin, commit and rollback raise DatabaseUnavailable
    for outages (the body's own errors are the session's to translate)."""

    async def __aenter__(self) -> AsyncSessionTransaction:
        with database_outages():
            return await super().__aenter__()

    async def __aexit__(
        self,
        type_: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with database_outages():
            await super().__aexit__(type_, value, traceback)


class _Session(DbSession):
    """An AsyncSession whose `async with` raises DatabaseUnavailable for outages, and
    whose transactions (`begin()`, also via the maker's `begin()`) do too."""

    def begin(self) -> AsyncSessionTransaction:
        return _Transaction(self)

    async def __aexit__(
        self,
        type_: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with database_outages():
            await super().__aexit__(type_, value, traceback)  # closes the session
        if isinstance(value, Exception) and (translated := _unavailable(value)) is not None:
            raise translated from value


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[DbSession]:
    """The store's session factory: `async with db() as s` and `async with db.begin() as
    s` as with SQLAlchemy's, but an outage raises DatabaseUnavailable."""
    return async_sessionmaker[DbSession](engine, class_=_Session, expire_on_commit=False)


def _alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


def _is_current(connection: Connection) -> bool:
    heads = set(ScriptDirectory.from_config(_alembic_config()).get_heads())
    current = set(MigrationContext.configure(connection).get_current_heads())
    return current == heads


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


async def migrations_current(engine: AsyncEngine) -> bool:
    """True when the database is at the newest migration."""
    async with engine.connect() as conn:
        return await conn.run_sync(_is_current)
