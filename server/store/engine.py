"""The database engine: URL normalisation, SQLite pragmas, migrations, and the session
factory, whose sessions turn an outage of the database into DatabaseUnavailable (see
`outages.py`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSessionTransaction,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.orm import Session

from .. import migrations as _migrations  # type: ignore[attr-defined]  # top-level migrations/
from .app_names import application_name
from .notify import BUS, Bus, committed, rolled_back
from .outages import database_outages, unavailable
from .pools import IdleClosingPool, PoolSize

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


def create_engine(
    url: str,
    *,
    statement_timeout_s: float = 10.0,
    pool_timeout_s: float = 5.0,
    pool: PoolSize = PoolSize(),  # noqa: B008  (frozen: one shared default is fine)
    purpose: str = "main",
    pooled: bool = False,
) -> AsyncEngine:
    """An async engine whose callers wait at most `pool_timeout_s` for a connection;
    PostgreSQL cancels statements after `statement_timeout_s`, and names each connection
    `application_name(purpose)`. `pooled`: the URL is a pooler's in transaction mode
    (PgBouncer), which keeps no session state: no startup options, no prepared statements,
    the statement timeout set in each transaction. SQLite gets WAL, a busy timeout and
    foreign keys, and files only the server's user can read (see `private_sqlite_files`)."""
    url = async_url(url)
    if is_sqlite(url):
        private_sqlite_files(make_url(url).database)
        engine = create_async_engine(url, connect_args={"timeout": 30}, pool_timeout=pool_timeout_s)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    # Every statement is bounded, so one slow query (or a lock held elsewhere) cannot keep
    # a connection from everyone else for long.
    timeout_ms = round(statement_timeout_s * 1000)
    connect_args: dict[str, object] = {"application_name": application_name(purpose)}
    if pooled:
        # A server connection serves another client's next transaction: a statement
        # prepared on it would collide (or be missing), a SET would leak.
        connect_args["prepare_threshold"] = None
    else:
        connect_args["options"] = f"-c statement_timeout={timeout_ms}"
    engine = create_async_engine(
        url,
        poolclass=IdleClosingPool,
        pool_size=pool.size,
        max_overflow=pool.overflow,
        pool_use_lifo=True,  # the connections a light load needs stay warm, the rest idle
        pool_timeout=pool_timeout_s,
        pool_pre_ping=True,
        connect_args=connect_args,
    )
    if pooled:

        @event.listens_for(engine.sync_engine, "begin")
        def _statement_timeout(conn: Connection) -> None:
            # SET LOCAL lasts until the transaction's end: what a transaction pooler keeps.
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {timeout_ms}")

    return engine


def on_connection_failure(engine: AsyncEngine, failed: Callable[[BaseException], None]) -> None:
    """Tell `failed(error)` (the driver's) when `engine` cannot open a connection, or loses
    one in use (not when its pre-ping finds a stale one: the pool replaces that itself)."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def _failed(context: ExceptionContext) -> None:
        if context.is_pre_ping or not (context.connection is None or context.is_disconnect):
            return
        error = context.original_exception
        # A task cancelled in a connect or a statement (its caller went away) drops that
        # connection (SQLAlchemy counts it a disconnect), but says nothing of the
        # database: only errors (the driver's, an OS error) do.
        if isinstance(error, Exception):
            failed(error)


class _Transaction(AsyncSessionTransaction):
    """A session's transaction whose begin, commit and rollback raise DatabaseUnavailable
    for outages (the body's own errors are the session's to translate)."""

    async def __aenter__(self) -> AsyncSessionTransaction:
        with database_outages():
            return await super().__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        with database_outages():
            await super().__aexit__(*exc_info)


class _SyncSession(Session):
    """The ORM session under `_Session`: at each commit it delivers what the transaction
    notified (see `notify.py`)."""


@event.listens_for(_SyncSession, "after_commit")
def _after_commit(session: Session) -> None:
    committed(session.info)


@event.listens_for(_SyncSession, "after_rollback")
def _after_rollback(session: Session) -> None:
    rolled_back(session.info)


class _Session(DbSession):
    """An AsyncSession whose `async with` raises DatabaseUnavailable for outages, and
    whose transactions (`begin()`, also via the maker's `begin()`) do too."""

    sync_session_class = _SyncSession

    def begin(self) -> AsyncSessionTransaction:
        return _Transaction(self)

    async def __aexit__(self, *exc_info: object) -> None:
        with database_outages():
            await super().__aexit__(*exc_info)  # closes the session
        value = exc_info[1]
        if isinstance(value, Exception) and (translated := unavailable(value)) is not None:
            raise translated from value


def private_sqlite_files(database: str | None) -> None:
    """Make the SQLite file (and its -wal and -shm, if there) mode 0600, creating it so
    when missing: SQLite gives the -wal and -shm it creates the database file's mode, and
    they hold every tenant's prompts and transcripts."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.parent.is_dir():
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if name.exists():
            name.chmod(0o600)


def sessionmaker(engine: AsyncEngine, bus: Bus | None = None) -> async_sessionmaker[DbSession]:
    """The store's session factory: `async with db() as s` and `async with db.begin() as
    s` as with SQLAlchemy's, but an outage raises DatabaseUnavailable; what a transaction
    notifies goes to `bus` at its commit."""
    return async_sessionmaker[DbSession](
        engine, class_=_Session, expire_on_commit=False, info={BUS: bus or Bus()}
    )


def bus_of(db: async_sessionmaker[DbSession]) -> Bus:
    """The bus that `db`'s commits deliver to."""
    bus = db.kw["info"][BUS]
    assert isinstance(bus, Bus)
    return bus


def _alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # A migration may rewrite a large table: it is not held to a call's timeout.
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
    command.upgrade(_alembic_config(connection), "head")


def _is_current(connection: Connection) -> bool:
    heads = set(ScriptDirectory.from_config(_alembic_config()).get_heads())
    current = set(MigrationContext.configure(connection).get_current_heads())
    return current == heads


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


def _revisions(connection: Connection) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    script = ScriptDirectory.from_config(_alembic_config())
    current = frozenset(MigrationContext.configure(connection).get_current_heads())
    known = frozenset(r.revision for r in script.walk_revisions())
    return current, frozenset(script.get_heads()), known


async def revisions(engine: AsyncEngine) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The database's current revisions, the newest of this release's migrations, and
    every revision this release has (reads only)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_revisions)


async def migrations_current(engine: AsyncEngine) -> bool:
    """True when the database is at the newest migration."""
    async with engine.connect() as conn:
        return await conn.run_sync(_is_current)
