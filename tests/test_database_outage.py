"""With the database gone every RPC answers UNAVAILABLE with ErrorInfo (reason
DATABASE_UNAVAILABLE, domain agentplane.dev), never INTERNAL; when it is back the same
RPCs serve again without a restart.

SQLite: the database's folder (file, -wal and -shm) is moved away, or replaced by an
empty one (SQLite then creates an empty database without agentplane's tables).
PostgreSQL: the database refuses connections and its backends are terminated.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from agentplane.server.store.outages import outage
from agentplane.v1 import budget_pb2, session_pb2, usage_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Harness, error_details, start_harness, stop_harness
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ABSENT = str(uuid.uuid4())  # a session id no server has: every answer for it is the database's
# What a message for callers must never carry (URL, credentials, SQL).
SECRETS = ("postgresql", "sqlite:", "127.0.0.1", "password", "SELECT", "INSERT", "[SQL")


@pytest.fixture(scope="module")
async def h(database_url: str) -> AsyncIterator[Harness]:
    # Readiness re-checked every 0.2 s and leases renewed every second: both run during
    # the outages below.
    harness = await start_harness(database_url, health_interval_s=0.2, lease_ttl_s=3.0)
    yield harness
    await stop_harness(harness)


async def readiness(h: Harness) -> int:
    health = health_pb2_grpc.HealthStub(h.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
    return int(reply.status)


async def wait_readiness(h: Harness, wanted: int) -> None:
    # Bounded generously: a loaded machine takes seconds to notice and to check.
    try:
        async with asyncio.timeout(60):
            while await readiness(h) != wanted:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"readiness never became {wanted}") from None


@asynccontextmanager
async def database_gone(h: Harness, how: str = "moved") -> AsyncIterator[None]:
    """The database is unusable inside; afterwards it is back and the server ready."""
    if h.database_url.startswith("postgresql"):
        async with _refused(h):
            yield
    else:
        async with _sqlite_gone(h, replaced=how == "replaced"):
            yield
    await wait_readiness(h, SERVING)


@asynccontextmanager
async def _refused(h: Harness) -> AsyncIterator[None]:
    name = make_url(h.database_url).database
    admin = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    )
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        try:
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


@asynccontextmanager
async def _sqlite_gone(h: Harness, *, replaced: bool) -> AsyncIterator[None]:
    # Moving the whole folder takes the -wal and -shm files along, and nothing can be
    # created at the path meanwhile (even by root, whom permissions would not stop).
    folder = Path(str(make_url(h.database_url).database)).parent
    away = folder.with_name(folder.name + ".away")
    folder.rename(away)
    if replaced:
        folder.mkdir()  # SQLite creates a new, empty database file here
    # An open SQLite connection keeps reading the file it opened, wherever it was moved:
    # the outage shows on new connections, so the pools' idle ones are closed (as any
    # recycling of connections would): the callers' and the running sessions' (lease
    # upkeep's too).
    await _dispose_pools(h)
    try:
        yield
    finally:
        if replaced:
            shutil.rmtree(folder)
        away.rename(folder)
        if replaced:
            # Connections opened meanwhile hold the empty replacement open, as above.
            await _dispose_pools(h)


async def _dispose_pools(h: Harness) -> None:
    await h.app.engine.dispose()
    if h.app.upkeep_engine is not None:
        await h.app.upkeep_engine.dispose()


def assert_unavailable(err: grpc.aio.AioRpcError, *reasons: str) -> None:
    """UNAVAILABLE with ErrorInfo, a reason among `reasons`, and a message for people."""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    info = error_details(err)["ErrorInfo"]
    assert info.domain == "agentplane.dev"
    assert info.reason in (reasons or ("DATABASE_UNAVAILABLE",)), info.reason
    message = err.details() or ""
    if info.reason == "DATABASE_UNAVAILABLE":
        assert message.endswith("retry later"), message
        assert not any(secret.lower() in message.lower() for secret in SECRETS), message


async def not_found(call: Awaitable[Any]) -> None:
    """The answer for ABSENT: the database was asked, and has no such session."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()


async def get_session(h: Harness) -> Any:
    return await h.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=ABSENT), metadata=h.auth()
    )


async def stream_session(h: Harness) -> Any:
    call = h.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=ABSENT), metadata=h.auth()
    )
    return [event async for event in call]


async def cancel_session(h: Harness) -> Any:
    return await h.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=ABSENT), metadata=h.auth()
    )


async def list_sessions(h: Harness) -> Any:
    return await h.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=h.auth())


_UNREAD_DAYS = itertools.count()


async def get_budget(h: Harness) -> Any:
    # A day nothing has read yet: a window read before (today's, which the budget gauges
    # read) may be known in memory, and is then answered, exact, without the database.
    day = datetime.date(2001, 1, 1) + datetime.timedelta(days=next(_UNREAD_DAYS))
    request = budget_pb2.GetBudgetRequest(date=day.isoformat())
    return await h.budgets.GetBudget(request, metadata=h.auth())


async def get_usage(h: Harness) -> Any:
    return await h.usage.GetUsage(usage_pb2.GetUsageRequest(), metadata=h.auth())


Rpc = Callable[[Harness], Awaitable[Any]]
READS: dict[str, tuple[Rpc, bool]] = {  # the call, and whether ABSENT makes it NOT_FOUND
    "GetSession": (get_session, True),
    "StreamSession": (stream_session, True),
    "CancelSession": (cancel_session, True),
    "ListSessions": (list_sessions, False),
    "GetBudget": (get_budget, False),
    "GetUsage": (get_usage, False),
}


@pytest.mark.parametrize("rpc", list(READS))
async def test_a_query_is_unavailable_while_the_database_is_gone(h: Harness, rpc: str) -> None:
    call, absent = READS[rpc]
    async with database_gone(h):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(h)
        assert_unavailable(caught.value)
    if absent:
        await not_found(call(h))
    else:
        await call(h)


async def test_run_session_is_unavailable_and_creates_nothing(h: Harness) -> None:
    request_id = str(uuid.uuid4())
    before = len((await list_sessions(h)).sessions)
    async with database_gone(h):
        # A request_id is looked up before readiness is consulted: this refusal is the
        # database's own, whatever readiness says yet.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.run(prompt="hi", request_id=request_id)
        assert_unavailable(caught.value)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.run(prompt="hi")
        # Without one, readiness refuses first once it noticed, else the database does:
        # the same answer either way, and never the driver's words (hosts, names).
        assert_unavailable(caught.value)
        await wait_readiness(h, NOT_SERVING)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.run(prompt="hi")
        assert_unavailable(caught.value)
    assert len((await list_sessions(h)).sessions) == before
    events = await h.run(prompt="hi", request_id=request_id)  # the request_id is still new
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert events[-1].result.session.request_id == request_id


async def test_a_replaced_sqlite_file_is_unavailable_too(h: Harness) -> None:
    if not h.database_url.startswith("sqlite"):
        pytest.skip("a SQLite file replaced by an empty database")
    async with database_gone(h, "replaced"):  # "no such table", not "unable to open"
        for rpc in ("GetSession", "ListSessions", "GetBudget", "GetUsage"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await READS[rpc][0](h)
            assert_unavailable(caught.value)
            assert "tables" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.run(prompt="hi", request_id=str(uuid.uuid4()))
        assert_unavailable(caught.value)
    assert (await get_budget(h)).tenant == "acme"


async def test_the_server_serves_again_and_its_upkeep_survived(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "agentplane.server.sessions.replicas.leases")
    async with database_gone(h):
        await wait_readiness(h, NOT_SERVING)
        async with asyncio.timeout(60):  # a lease-upkeep round fails meanwhile, and says why
            while not [r for r in caplog.records if "lease upkeep failed" in r.getMessage()]:
                await asyncio.sleep(0.05)
    # The periodic upkeep (lease renewal and recovery, readiness) kept running through it.
    assert all(not task.done() for task in h.app._background)
    events = await h.run(prompt="hi")
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    got = await h.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=events[0].session_id), metadata=h.auth()
    )
    assert got.state == session_pb2.SESSION_STATE_COMPLETE
    assert Decimal((await get_budget(h)).reserved_usd) == 0
    assert (await get_usage(h)).sessions_total >= 1


def test_which_database_errors_are_outages() -> None:
    """Outages (availability) are translated; constraint violations and bugs are not."""

    def wrapped(orig: Exception, cls: type[Any] = OperationalError) -> Any:
        return cls("SELECT 1", {}, orig)

    class Psycopg(Exception):
        def __init__(self, sqlstate: str | None) -> None:
            super().__init__("x")
            self.sqlstate = sqlstate

    class Sqlite(Exception):
        def __init__(self, code: int, message: str) -> None:
            super().__init__(message)
            self.sqlite_errorcode = code

    assert outage(wrapped(Psycopg(None))) is not None  # refused, closed
    assert outage(wrapped(Psycopg("57P01"))) is not None  # terminated
    assert outage(wrapped(Psycopg("53300"))) is not None  # too many connections
    assert outage(wrapped(Psycopg("40P01"))) is None  # a deadlock is a conflict
    assert outage(wrapped(Psycopg("42601"))) is None  # a syntax error is a bug
    assert outage(wrapped(Psycopg("23505"), IntegrityError)) is None  # admission's race
    assert outage(wrapped(Sqlite(14, "unable to open database file"))) is not None
    assert outage(wrapped(Sqlite(1, "no such table: sessions"))) is not None
    assert outage(wrapped(Sqlite(1, 'near "SELEC": syntax error'))) is None
    assert outage(wrapped(Sqlite(2067, "UNIQUE constraint failed"), IntegrityError)) is None
    assert outage(wrapped(Sqlite(5, "database is locked"))) is None
    assert outage(ValueError("not a database error")) is None
