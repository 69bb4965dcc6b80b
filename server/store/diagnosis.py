"""What an operator is told when the database cannot be used: the driver's cause on one
line and what to do about it; and, for `check-config`, whether the database is there and
at the newest migration. (Callers are told less: see `outages.py`.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from ..errors import ConfigError
from .engine import async_url, create_engine, is_sqlite, revisions
from .outages import cause

SETTING = "AGENTPLANE_DATABASE_URL"
# How long check-config waits for the database to answer.
CHECK_TIMEOUT_S = 10.0


def shown(url: str | URL) -> str:
    """The URL as logs and messages may show it: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def remedy(reason: str, url: str | URL) -> str:
    """What to do about `reason` (a `cause`) with the database at `url`."""
    parsed = make_url(url)
    text = reason.lower()
    if "does not exist" in text and 'database "' in text:
        where = f"-h {parsed.host or 'localhost'} -p {parsed.port or 5432}"
        user = f" -U {parsed.username}" if parsed.username else ""
        return (
            f"create it (`createdb {where}{user} {parsed.database}`), or set {SETTING} to "
            "one that exists"
        )
    if "does not exist" in text and 'role "' in text:
        return f"create that role, or set the user in {SETTING} to one that exists"
    if "password" in text:
        return f"set the right user and password in {SETTING}"
    if "unable to open database file" in text:
        return f"the folder of {parsed.database} must exist and be writable by this user"
    if any(s in text for s in ("refused", "resolve host", "timeout", "no answer", "no route")):
        return f"start the database server, or set {SETTING} to where it runs"
    return f"check {SETTING} and the database server"


def explain(exc: BaseException, url: str | URL) -> str:
    """`cause` and `remedy`, on one line."""
    reason = cause(exc)
    return f"{reason}; {remedy(reason, url)}"


async def check(url: str, *, migrated_at_start: bool) -> str:
    """Whether a server could use the database at `url` now: ConfigError (naming the
    problem and what to do) when it cannot be reached, or its schema is not the newest and
    the server would not migrate it at start; else one line saying what was found. Never
    creates nor changes anything."""
    if is_sqlite(url):
        missing = _sqlite_file_problem(url, migrated_at_start)
        if missing is not None:
            return missing
        # Not create_engine: that would create the file and change its mode.
        engine = create_async_engine(async_url(url))
    else:
        engine = create_engine(url)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            current, heads, known = await revisions(engine)
    except (DBAPIError, OSError, TimeoutError) as exc:
        raise ConfigError(SETTING, f"cannot connect to {shown(url)}: {explain(exc, url)}") from None
    finally:
        await engine.dispose()
    newest = ", ".join(sorted(heads))
    if current == heads:
        return f"database: {shown(url)}, at the newest migration ({newest})"
    at = f"is at revision {', '.join(sorted(current))}" if current else "was never migrated"
    if current - known:
        raise ConfigError(
            SETTING,
            f"{shown(url)} {at}, which this release does not have (a newer agentplane "
            "migrated it?): run that release or a newer one",
        )
    if migrated_at_start:
        return f"database: {shown(url)} {at}; serve migrates it to {newest} at start"
    raise ConfigError(
        SETTING,
        f"{shown(url)} {at} (the newest migration is {newest}): run "
        "`agentplane-server migrate` (or set AGENTPLANE_AUTO_MIGRATE=1)",
    )


def sqlite_folder(url: str) -> Path | None:
    """The folder of a SQLite database file (None: not SQLite, or in memory)."""
    if not is_sqlite(url):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).parent


def _sqlite_file_problem(url: str, migrated_at_start: bool) -> str | None:
    """For a SQLite file not there yet: what the server would do (a line), or ConfigError
    when it could not create it. None: the file is there (or it is in memory)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(SETTING, f"{path} is not readable and writable by this user")
        return None
    if not path.parent.is_dir():
        raise ConfigError(SETTING, f"{path}: the folder {path.parent} does not exist; create it")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(SETTING, f"{path}: the folder {path.parent} is not writable by this user")
    if not migrated_at_start:
        raise ConfigError(
            SETTING,
            f"{path} does not exist: run `agentplane-server migrate` (or set "
            "AGENTPLANE_AUTO_MIGRATE=1)",
        )
    return f"database: {path} does not exist yet; created and migrated at start"
