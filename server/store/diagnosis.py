"""What an operator is told when the database cannot be used: the driver's cause on one
line and what to do about it; and, for `check-config`, whether the database is there and
at the newest migration. (Callers are told less: see `outages.py`.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..errors import ConfigError
from .engine import async_url, create_engine, is_sqlite, revisions
from .notify import Bus, Listener
from .outages import cause

SETTING = "AGENTPLANE_DATABASE_URL"
LISTEN_SETTING = "AGENTPLANE_DATABASE_LISTEN_URL"
# PgBouncer (transaction mode) refuses the startup options a direct connection carries.
POOLER_HINT = (
    f"{SETTING} looks like PgBouncer's: set {LISTEN_SETTING} to PostgreSQL itself, which "
    "also makes the pools fit for transaction pooling"
)
LISTEN_POOLER_HINT = (
    f"{LISTEN_SETTING} looks like PgBouncer's: point it at PostgreSQL itself (the LISTEN "
    "connection and migrations need a database session of their own)"
)
# How long check-config waits for the database to answer.
CHECK_TIMEOUT_S = 10.0


def shown(url: str | URL) -> str:
    """The URL as logs and messages may show it: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def remedy(reason: str, url: str | URL, setting: str = SETTING) -> str:
    """What to do about `reason` (a `cause`) with the database at `url`, which the
    variable `setting` names."""
    parsed = make_url(url)
    text = reason.lower()
    if "unsupported startup parameter" in text:
        return LISTEN_POOLER_HINT if setting == LISTEN_SETTING else POOLER_HINT
    if "does not exist" in text and 'database "' in text:
        where = f"-h {parsed.host or 'localhost'} -p {parsed.port or 5432}"
        user = f" -U {parsed.username}" if parsed.username else ""
        return (
            f"create it (`createdb {where}{user} {parsed.database}`), or set {setting} to "
            "one that exists"
        )
    if "does not exist" in text and 'role "' in text:
        return f"create that role, or set the user in {setting} to one that exists"
    if "password" in text:
        return f"set the right user and password in {setting}"
    if "unable to open database file" in text:
        return f"the folder of {parsed.database} must exist and be writable by this user"
    if any(s in text for s in ("refused", "resolve host", "timeout", "no answer", "no route")):
        return f"start the database server, or set {setting} to where it runs"
    return f"check {setting} and the database server"


def explain(exc: BaseException, url: str | URL, setting: str = SETTING) -> str:
    """`cause` and `remedy`, on one line."""
    reason = cause(exc)
    return f"{reason}; {remedy(reason, url, setting)}"


async def check(url: str, *, migrated_at_start: bool, listen_url: str | None = None) -> str:
    """Whether a server could use the database at `url` now: ConfigError (naming the
    problem and what to do) when it cannot be reached, or its schema is not the newest and
    the server would not migrate it at start; else one line saying what was found. Never
    creates nor changes anything.

    `listen_url` (AGENTPLANE_DATABASE_LISTEN_URL): `url` is a pooler's in transaction mode,
    reached as the pools reach it (no startup options, no prepared statements). On
    PostgreSQL the LISTEN connection (at `listen_url`, else `url`) must also hear a NOTIFY
    sent through `url`, as a replica's does before it is ready."""
    if is_sqlite(url):
        missing = _sqlite_file_problem(url, migrated_at_start)
        if missing is not None:
            return missing
        # Not create_engine: that would create the file and change its mode.
        engine = create_async_engine(async_url(url))
    else:
        engine = create_engine(url, pooled=listen_url is not None, purpose="check-config")
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            current, heads, known = await revisions(engine)
        if not is_sqlite(url):
            await _hears_itself(
                engine, listen_url or url, LISTEN_SETTING if listen_url else SETTING
            )
    except (DBAPIError, OSError, TimeoutError) as exc:
        raise ConfigError(SETTING, f"cannot connect to {shown(url)}: {explain(exc, url)}") from None
    finally:
        await engine.dispose()
    where = shown(url) if listen_url is None else f"{shown(url)} (LISTEN: {shown(listen_url)})"
    newest = ", ".join(sorted(heads))
    if current == heads:
        return f"database: {where}, at the newest migration ({newest})"
    at = f"is at revision {', '.join(sorted(current))}" if current else "was never migrated"
    if current - known:
        raise ConfigError(
            SETTING,
            f"{where} {at}, which this release does not have (a newer agentplane "
            "migrated it?): run that release or a newer one",
        )
    if migrated_at_start:
        return f"database: {where} {at}; serve migrates it to {newest} at start"
    raise ConfigError(
        SETTING,
        f"{where} {at} (the newest migration is {newest}): run "
        "`agentplane-server migrate` (or set AGENTPLANE_AUTO_MIGRATE=1)",
    )


async def _hears_itself(engine: AsyncEngine, listen_url: str, setting: str) -> None:
    """ConfigError unless a LISTEN connection at `listen_url` (named by `setting`) hears
    its own NOTIFY sent through `engine`: the server's own check, once."""
    verdicts: list[str | None] = []
    listener = Listener(
        listen_url,
        Bus(),
        notify_through=engine,
        status=verdicts.append,
        describe=lambda error: explain(error, listen_url, setting),
        check_s=CHECK_TIMEOUT_S,
    )
    task = asyncio.create_task(listener.run())
    try:
        await listener.tried.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if verdicts and verdicts[0] is not None:
        raise ConfigError(setting, f"{shown(listen_url)}: {verdicts[0]}")


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
