"""Readiness means able to serve: a replica without its LISTEN connection cannot hear the
others (their cancels, events, budget changes), one whose callers' pool cannot connect
cannot answer them; either is NOT_SERVING and refuses new sessions at admission until it
recovers, then SERVING again by itself. (The whole database gone, the running sessions'
pool with it: tests/test_database_outage.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest
from agentplane.server.health import DEAF
from agentplane.server.store.pools import IdleClosingPool
from agentplane.v1 import session_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Harness, error_details, start_harness, stop_harness
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from test_server_process import free_port

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def postgres_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's (SQLite serves one server)")
    return database_url


async def readiness(h: Harness) -> int:
    health = health_pb2_grpc.HealthStub(h.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
    return int(reply.status)


async def wait_readiness(h: Harness, wanted: int, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await readiness(h) == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"readiness never became {wanted}")


async def session_ids(h: Harness) -> set[str]:
    listed = await h.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=h.auth())
    return {s.id for s in listed.sessions}


async def assert_refused_at_admission(h: Harness) -> None:
    before = await session_ids(h)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.run(prompt="hello")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value)["ErrorInfo"].reason == "DATABASE_UNAVAILABLE"
    assert caught.value.details() == DEAF
    assert await session_ids(h) == before  # nothing was admitted


@contextlib.asynccontextmanager
async def forwarder(port: int, to: tuple[str, int]) -> AsyncIterator[None]:
    """A TCP relay from 127.0.0.1:`port` to `to` (PostgreSQL), while inside."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*to)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_a_replica_whose_listen_url_answers_nothing_is_not_serving_until_it_does(
    postgres_url: str,
) -> None:
    port = free_port()  # nothing listens there yet
    listen_url = make_url(postgres_url).set(host="127.0.0.1", port=port)
    h = await start_harness(
        postgres_url, database_listen_url=listen_url.render_as_string(hide_password=False)
    )
    try:
        assert await readiness(h) == NOT_SERVING
        assert h.app.health.problem == DEAF
        await assert_refused_at_admission(h)
        target = make_url(postgres_url)
        async with forwarder(port, (target.host or "127.0.0.1", target.port or 5432)):
            await wait_readiness(h, SERVING)  # it retries by itself
            events = await h.run(prompt="hello")
            assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    finally:
        await stop_harness(h)


async def test_a_replica_that_loses_its_listen_connection_is_not_serving_until_it_is_back(
    postgres_url: str,
) -> None:
    """Its LISTEN backend is terminated and cannot log in again (a role of its own is
    refused); the pools are untouched."""
    role = f"ap_listen_{uuid.uuid4().hex[:8]}"
    admin = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    )
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    listen_url = make_url(postgres_url).set(username=role)
    h = await start_harness(
        postgres_url,
        database_listen_url=listen_url.render_as_string(hide_password=False),
        health_interval_s=0.2,
    )
    try:
        await wait_readiness(h, SERVING)
        await admin.execute(f"ALTER ROLE {role} NOLOGIN")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        await wait_readiness(h, NOT_SERVING)
        await assert_refused_at_admission(h)
        await admin.execute(f"ALTER ROLE {role} LOGIN")
        await wait_readiness(h, SERVING)
        events = await h.run(prompt="hello")
        assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    finally:
        await stop_harness(h)
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_a_replica_whose_callers_pool_cannot_connect_is_not_serving_until_it_can(
    postgres_url: str,
) -> None:
    """The database refuses new connections while the running sessions' pool and the
    LISTEN connection keep theirs (as when max_connections is reached): the callers' pool,
    which closed its idle connections, cannot open one. The first call that finds so turns
    readiness NOT_SERVING; readiness re-checks that pool until it connects again."""
    h = await start_harness(postgres_url, db_idle_timeout_s=0.5, health_interval_s=0.2)
    name = make_url(postgres_url).database
    admin = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    )
    pool = h.app.engine.sync_engine.pool
    assert isinstance(pool, IdleClosingPool)
    try:
        await wait_readiness(h, SERVING)
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        while pool.connections() > 0:  # the callers' pool went idle
            assert loop.time() < end, "the callers' pool kept its connections"
            await asyncio.sleep(0.1)
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=h.auth())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await wait_readiness(h, NOT_SERVING)
        assert h.app.notifications is not None and h.app.notifications.listening.is_set()
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # refused at admission
            await h.run(prompt="hello")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(refused.value)["ErrorInfo"].reason == "DATABASE_UNAVAILABLE"
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await wait_readiness(h, SERVING)
        events = await h.run(prompt="hello")
        assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        await stop_harness(h)


async def test_a_call_cancelled_in_a_statement_leaves_readiness_alone(harness: Harness) -> None:
    """A caller that goes away while its call runs a statement (its task cancelled: the
    connection is dropped, its state unknown) says nothing of the database: readiness
    stays SERVING."""
    await wait_readiness(harness, SERVING)
    for engine in (harness.app.engine, harness.app.upkeep_engine):
        assert engine is not None
        for delay in range(40):  # cancelled at different points of the call

            async def call(engine: AsyncEngine = engine) -> None:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))

            task = asyncio.create_task(call())
            for _ in range(delay):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.1)  # what a connection failure would have spawned has run
    assert harness.app.health.problem is None
    assert await readiness(harness) == SERVING
