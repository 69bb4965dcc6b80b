"""Which database errors are outages, and what a caller is told about one.

An outage (unreachable, storage gone, read-only, out of resources, schema missing) becomes
DatabaseUnavailable: UNAVAILABLE with reason DATABASE_UNAVAILABLE on the wire, and what
the end of a session and lease upkeep retry on. Other database errors (constraint
violations, conflicts, bugs) pass unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc

from ..errors import DatabaseUnavailable
from ..recurring import RecurringProblem

log = logging.getLogger(__name__)
# Every call that meets the same outage would log it again: its cause is logged once,
# then at growing intervals while it lasts (lease upkeep meets it every few seconds); a
# minute without one ends it.
_problems = RecurringProblem(log, "database unavailable", new_after_s=60.0)

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
TOO_SLOW = (
    "a database statement ran past its timeout (AGENTPLANE_DB_STATEMENT_TIMEOUT_S), or was "
    "cancelled by an operator; retry later"
)

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
# 40xxx (deadlock, serialization failure: conflicts), XX (internal errors, corruption),
# the rest of 42 (a statement's syntax or access: bugs).
_SQLSTATES = {
    "08": UNREACHABLE,  # connection exceptions
    "53": EXHAUSTED,  # insufficient resources: disk full, out of memory, too many connections
    "57014": TOO_SLOW,  # query_canceled: statement_timeout, or pg_cancel_backend
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


def cause(exc: BaseException) -> str:
    """What went wrong in the driver's own words: the first line of its message (not
    the statement, parameters or context lines after it, which are never logged); for
    operators (it may name hosts and databases), never callers."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(orig).__name__


def unavailable(exc: BaseException) -> DatabaseUnavailable | None:
    message = outage(exc)
    if message is None:
        return None
    _problems.failed(cause(exc))
    return DatabaseUnavailable(message)


@contextmanager
def database_outages() -> Iterator[None]:
    """Re-raise an outage of the database as DatabaseUnavailable (the driver's error
    chained); any other exception passes unchanged. For work outside `sessionmaker`'s
    sessions, e.g. a read on a bare connection."""
    try:
        yield
    except Exception as exc:
        translated = unavailable(exc)
        if translated is None:
            raise
        raise translated from exc
