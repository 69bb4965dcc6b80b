"""PgBouncer in transaction mode as a supported deployment: the pools go through it, the
LISTEN connection straight to PostgreSQL (AGENTPLANE_DATABASE_LISTEN_URL). Nothing relies
on session state there: no startup options, no prepared statements, the statement timeout
set per transaction. A LISTEN URL that points at PgBouncer is caught at start: the replica
says NOT_SERVING, and why, instead of believing it hears the others.

`migrate` goes straight to PostgreSQL (the LISTEN URL), and `check-config` reaches the
database as the pools do and proves the LISTEN URL as a replica does.

(Cancel, followers and GetBudget across replicas through PgBouncer: the `pgbouncer` cases
of tests/test_replicas.py; Respond and artifacts: those of the `replicas` fixture's users.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import grpc
import psycopg
import pytest
from agentplane.server.app import App
from agentplane.server.config import Settings
from agentplane.server.store.diagnosis import LISTEN_POOLER_HINT, POOLER_HINT, shown
from agentplane.server.store.engine import create_engine
from agentplane.server.store.outages import TOO_SLOW
from agentplane.server.tenants import TenantRegistry
from agentplane.v1 import session_pb2, session_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    MODEL,
    Harness,
    PostgresDatabase,
    error_details,
    start_harness,
    stop_harness,
)
from pgbouncer import PgBouncer
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from test_operator_mistakes import run_server, server_env, the_one_line

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def postgres_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("PgBouncer fronts PostgreSQL")
    return database_url


@pytest.fixture
async def pooled(postgres_url: str, bouncer: PgBouncer) -> AsyncIterator[Harness]:
    """A server whose pools go through PgBouncer, with a half-second statement timeout."""
    h = await start_harness(
        bouncer.url(postgres_url),
        database_listen_url=postgres_url,
        db_statement_timeout_s=0.5,
    )
    assert h.app.engine.url.port == bouncer.port
    yield h
    await stop_harness(h)


async def readiness(app: App) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        return int(reply.status)


async def test_repeated_statements_on_many_connections_never_collide(
    postgres_url: str, bouncer: PgBouncer
) -> None:
    """psycopg prepares a statement run five times on a connection; through PgBouncer the
    next transaction may run on a server connection another client prepared it on (or
    not): "prepared statement "_pg3_0" already exists" / "does not exist". The pooled
    engines prepare nothing."""
    url = bouncer.url(postgres_url)
    engines = [create_engine(url, pooled=True) for _ in range(2)]
    failures: list[str] = []

    async def repeat(engine_index: int) -> None:
        for i in range(40):
            try:
                async with engines[engine_index].begin() as conn:
                    await conn.execute(text("SELECT CAST(:i AS int) + 1"), {"i": i})
            except DBAPIError as exc:
                failures.append(str(exc.orig))

    try:
        await asyncio.gather(*(repeat(e) for e in (0, 1) for _ in range(8)))
    finally:
        for engine in engines:
            await engine.dispose()
    assert failures == []


async def test_the_statement_timeout_holds_through_pgbouncer(pooled: Harness) -> None:
    # PgBouncer refuses startup options: the timeout is each transaction's own, in both pools.
    for engine in (pooled.app.engine, pooled.app.upkeep_engine):
        assert engine is not None
        async with engine.begin() as conn:
            assert (await conn.execute(text("SHOW statement_timeout"))).scalar() == "500ms"
        with pytest.raises(DBAPIError) as caught:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT pg_sleep(3)"))
        assert isinstance(caught.value.orig, psycopg.errors.QueryCanceled)
    # A call held up by a lock is answered UNAVAILABLE, as on a direct connection.
    direct = make_url(pooled.app.settings.direct_url).set(drivername="postgresql")
    async with await psycopg.AsyncConnection.connect(direct.render_as_string(False)) as lock:
        await lock.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pooled.sessions.ListSessions(
                session_pb2.ListSessionsRequest(), metadata=pooled.auth()
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == TOO_SLOW
        await lock.rollback()
    # And the pooler's server connections carry no timeout left over from a transaction.
    async with await psycopg.AsyncConnection.connect(
        make_url(pooled.database_url).set(drivername="postgresql").render_as_string(False),
        prepare_threshold=None,
    ) as through:
        for _ in range(10):
            assert (await (await through.execute("SHOW statement_timeout")).fetchone()) == ("0",)
            await through.commit()
    events = await pooled.run(prompt="hello")
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE


async def test_a_listen_url_through_pgbouncer_is_caught_at_start(
    postgres_url: str, bouncer: PgBouncer, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The LISTEN lands on a server connection PgBouncer hands to others between
    transactions: the replica never hears its own NOTIFY, and says so."""
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=postgres_url,
        database_listen_url=bouncer.url(postgres_url),
        work_dir=short_tmp / "w",
        auto_migrate=True,
    )
    caplog.set_level(logging.WARNING)
    app = await App.start(settings, TenantRegistry.dev())
    try:
        await app.ready()  # after the LISTEN connection's verdict
        assert await readiness(app) == NOT_SERVING
        assert app.notifications is not None and not app.notifications.listening.is_set()
        said = [r.getMessage() for r in caplog.records if r.name == "agentplane.server.health"]
        assert any("did not hear its own NOTIFY" in line for line in said), said
        assert any("AGENTPLANE_DATABASE_LISTEN_URL" in line for line in said), said
        # A session is refused at admission, never admitted to stay silent.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            sessions = session_pb2_grpc.SessionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in sessions.RunSession(
                    session_pb2.RunSessionRequest(prompt="hi", model=MODEL)
                ):
                    pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(caught.value)["ErrorInfo"].reason == "DATABASE_UNAVAILABLE"
        assert "LISTEN" in caught.value.details()
    finally:
        await app.stop(grace=1)


async def test_a_database_url_at_pgbouncer_without_a_listen_url_says_what_to_set(
    postgres_url: str, bouncer: PgBouncer, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=bouncer.url(postgres_url),
        work_dir=short_tmp / "w",
        auto_migrate=False,
    )
    caplog.set_level(logging.WARNING)
    app = await App.start(settings, TenantRegistry.dev())
    try:
        await app.ready()
        assert await readiness(app) == NOT_SERVING
        said = [r.getMessage() for r in caplog.records if r.name == "agentplane.server.health"]
        assert any(POOLER_HINT in line for line in said), said
    finally:
        await app.stop(grace=1)


@pytest.fixture
def fresh_database(postgres_url: str) -> Iterator[str]:
    """An empty database of its own on the test PostgreSQL server."""
    db = PostgresDatabase(postgres_url)
    yield db.create()
    db.drop()


async def command(*args: str, env: dict[str, str], timeout: float = 120) -> CompletedProcess[str]:
    """`agentplane-server <args>` in a process of its own (waited for off the event loop)."""
    return await asyncio.to_thread(run_server, *args, env=env, timeout=timeout)


async def test_migrate_and_check_config_reach_postgresql_as_the_server_does(
    fresh_database: str, bouncer: PgBouncer
) -> None:
    """Through PgBouncer the pools send no startup options: check-config reaches it the
    same way (and proves the LISTEN URL hears what goes through it); migrate goes straight
    to PostgreSQL, at the LISTEN URL."""
    through = bouncer.url(fresh_database)
    env = server_env(
        AGENTPLANE_DATABASE_URL=through,
        AGENTPLANE_DATABASE_LISTEN_URL=fresh_database,
        AGENTPLANE_AUTO_MIGRATE="0",
    )
    line = the_one_line(await command("check-config", env=env, timeout=60), alone=True)
    assert " was never migrated (the newest migration is " in line, line
    migrated = await command("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    done = await command("check-config", env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(LISTEN: {shown(fresh_database)}), at the newest migration" in done.stdout
    # Without a LISTEN URL the pools would send their startup options: refused, and said so.
    env.pop("AGENTPLANE_DATABASE_LISTEN_URL")
    line = the_one_line(await command("check-config", env=env, timeout=60), alone=True)
    assert "AGENTPLANE_DATABASE_URL: cannot connect to " in line, line
    assert line.endswith(POOLER_HINT), line


async def test_check_config_and_migrate_catch_a_listen_url_through_pgbouncer(
    postgres_url: str, bouncer: PgBouncer
) -> None:
    through = bouncer.url(postgres_url)
    env = server_env(AGENTPLANE_DATABASE_URL=through, AGENTPLANE_DATABASE_LISTEN_URL=through)
    line = the_one_line(await command("check-config", env=env, timeout=90), alone=True)
    assert line.startswith(
        "agentplane-server: invalid configuration: AGENTPLANE_DATABASE_LISTEN_URL: "
    ), line
    assert "did not hear its own NOTIFY" in line, line
    # migrate connects with the statement timeout among its startup options: refused.
    line = the_one_line(await command("migrate", env=env), alone=True)
    assert line.startswith(
        "agentplane-server: invalid configuration: AGENTPLANE_DATABASE_LISTEN_URL: cannot migrate "
    ), line
    assert line.endswith(LISTEN_POOLER_HINT), line
