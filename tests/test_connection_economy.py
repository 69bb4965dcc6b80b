"""Connection economy: PostgreSQL's connections are few and shared by every replica. An
idle replica holds two (one of the running sessions' pool, which readiness keeps warm,
and its LISTEN), a burst opens at most its pools' sizes plus overflow, and the pools
close what stays unused for AGENTPLANE_DB_IDLE_TIMEOUT_S. Each connection names its
replica and purpose in pg_stat_activity: `agentplane/<host>/<pid>/<purpose>`.

Real server processes (tests/replicas_harness.py) on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import psycopg
import pytest
from agentplane import AsyncClient
from agentplane.server.config import Settings
from agentplane.server.store import app_names
from agentplane.server.store.app_names import application_name
from agentplane.server.store.engine import create_engine
from agentplane.server.store.pools import IdleClosingPool, PoolSize
from harness import TOKENS
from private_postgres import private_postgres
from replicas_harness import SERVING, Replicas, requires_postgres, start_replicas
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.util import greenlet_spawn

# What a replica holds at idle, and at most (the documented arithmetic, default sizes).
IDLE = Counter({"write": 1, "listen": 1})
DEFAULTS = Settings()
MOST = (
    DEFAULTS.db_pool_size
    + DEFAULTS.db_pool_overflow
    + DEFAULTS.db_write_pool_size
    + DEFAULTS.db_write_pool_overflow
    + 1
)


async def held(fleet: Replicas) -> dict[int, Counter[str]]:
    """Each replica's (by pid) connections to the fleet's database, by purpose."""
    url = make_url(fleet.database_url)
    async with await psycopg.AsyncConnection.connect(
        host=url.host, port=url.port or 5432, user="postgres", dbname="postgres", autocommit=True
    ) as admin:
        rows = await (
            await admin.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = %s",
                (url.database,),
            )
        ).fetchall()
    host = socket.gethostname()
    found: dict[int, Counter[str]] = {r.proc.pid: Counter() for r in fleet.replicas}
    for (app,) in rows:
        prefix, _, rest = str(app).partition(f"agentplane/{host}/")
        pid, _, purpose = rest.partition("/")
        assert not prefix and pid.isdigit(), f"a connection not named as documented: {app!r}"
        if int(pid) in found:  # not the harness's own migration, say
            found[int(pid)][purpose] += 1
    return found


async def wait_idle(fleet: Replicas, timeout: float = 60) -> dict[int, Counter[str]]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        now = await held(fleet)
        if all(c == IDLE for c in now.values()) or loop.time() > end:
            return now
        await asyncio.sleep(0.2)


@requires_postgres
@pytest.mark.asyncio
async def test_idle_replicas_hold_two_connections_and_give_back_a_burst() -> None:
    env = {"AGENTPLANE_DB_IDLE_TIMEOUT_S": "1", "AGENTPLANE_HEALTH_INTERVAL_S": "0.5"}
    async with start_replicas(3, **env) as fleet:
        assert await wait_idle(fleet) == {r.proc.pid: IDLE for r in fleet.replicas}

        # A burst on every replica: many calls at once, sampled while they run.
        client = AsyncClient(fleet.addresses, token=TOKENS["acme"])
        peak: dict[int, int] = {}

        async def sample() -> None:
            while True:
                for pid, purposes in (await held(fleet)).items():
                    peak[pid] = max(peak.get(pid, 0), sum(purposes.values()))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            for _ in range(3):
                await asyncio.gather(*(client.list_sessions() for _ in range(120)))
        finally:
            sampler.cancel()
            await client.close()
        assert peak and max(peak.values()) <= MOST, peak
        assert any(n > sum(IDLE.values()) for n in peak.values()), peak  # the burst showed

        assert await wait_idle(fleet) == {r.proc.pid: IDLE for r in fleet.replicas}


def test_application_names_fit_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_names.socket, "gethostname", lambda: "pod-" + "x" * 80)
    name = application_name("write")
    assert len(name.encode()) <= 63
    assert name.startswith("agentplane/pod-x") and name.endswith(f"/{app_names.os.getpid()}/write")
    monkeypatch.setattr(app_names.socket, "gethostname", lambda: "höst")
    assert application_name("main").startswith("agentplane/h?st/")


@requires_postgres
@pytest.mark.asyncio
async def test_closing_idle_connections_during_bursts_keeps_the_pool_whole(
    database_url: str,
) -> None:
    """The pool's idle closing takes connections out of the pool and puts them back while
    bursts check out and return others: no call fails, none is lost or counted twice,
    and once idle the pool holds none."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the pools close idle connections on PostgreSQL")
    engine = create_engine(database_url, pool=PoolSize(2, 3, 0.05), purpose="pooltest")
    pool = engine.sync_engine.pool
    assert isinstance(pool, IdleClosingPool)
    failures: list[BaseException] = []
    closed = 0

    async def burst(worker: int) -> None:
        for i in range(40):
            try:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            except Exception as exc:  # noqa: BLE001  (any failure fails the test)
                failures.append(exc)
            await asyncio.sleep(0.001 * ((worker + i) % 5))

    async def reap() -> None:
        nonlocal closed
        while True:
            closed += await greenlet_spawn(pool.close_idle, 0.002)
            await asyncio.sleep(0.003)

    reaper = asyncio.create_task(reap())
    try:
        await asyncio.gather(*(burst(w) for w in range(8)))
    finally:
        reaper.cancel()
    try:
        assert failures == []
        assert closed > 0  # it did close connections between the bursts
        assert pool.checkedout() == 0 and pool.checkedin() <= pool.size()
        assert pool.connections() <= pool.size()
        await greenlet_spawn(pool.close_idle, 0)
        assert pool.connections() == 0
        name = application_name("pooltest")
        async with await psycopg.AsyncConnection.connect(
            host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
        ) as admin:
            left = await (
                await admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
                )
            ).fetchone()
        assert left == (0,)
        # The pool still serves after all that.
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()


# 20 replicas straight on a default PostgreSQL (max_connections 100, 3 reserved): each may
# hold at most 97 // 20 = 4, so pools of 1 + 1 and 1 + 0, plus the LISTEN connection (the
# README's arithmetic; more replicas than that go through PgBouncer).
FLEET = 20
SMALL = {
    "AGENTPLANE_DB_POOL_SIZE": "1",
    "AGENTPLANE_DB_POOL_OVERFLOW": "1",
    "AGENTPLANE_DB_WRITE_POOL_SIZE": "1",
    "AGENTPLANE_DB_WRITE_POOL_OVERFLOW": "0",
}
SMALL_MOST = 1 + 1 + 1 + 0 + 1


async def room_for_agentplane(server_url: str) -> int:
    """max_connections less the superuser reserve, of `server_url`'s server."""
    url = make_url(server_url)
    async with await psycopg.AsyncConnection.connect(
        host=url.host, port=url.port or 5432, user="postgres", dbname="postgres", autocommit=True
    ) as admin:
        row = await (
            await admin.execute(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
            )
        ).fetchone()
    assert row is not None
    return int(row[0])


@requires_postgres
@pytest.mark.slow
@pytest.mark.timeout(1200)  # 20 servers' start-up on a small, busy machine
@pytest.mark.asyncio
async def test_twenty_replicas_fit_a_default_postgresql() -> None:
    # A server of its own, as initdb makes it: tests running beside this one (pytest-xdist)
    # would take some of the shared server's connections.
    with private_postgres() as server:
        await twenty_replicas(server)


async def twenty_replicas(server: str) -> None:
    room = await room_for_agentplane(server)
    if FLEET * SMALL_MOST > room:
        pytest.skip(f"this PostgreSQL leaves {room} connections, fewer than its defaults' 97")
    env = {**SMALL, "AGENTPLANE_DB_IDLE_TIMEOUT_S": "1", "AGENTPLANE_HEALTH_INTERVAL_S": "2"}
    # Started a few at a time: 20 servers starting at once on a small machine outlast the
    # harness's patience for each.
    async with start_replicas(2, server_url=server, **env) as fleet:
        while len(fleet) < FLEET:
            await asyncio.gather(*(fleet.start(ready_within=300, **env) for _ in range(3)))
        for replica in fleet.replicas:  # all SERVING together, none lost its database
            await replica.wait_status(SERVING, "readiness")
        idle = await wait_idle(fleet)
        assert idle == {r.proc.pid: IDLE for r in fleet.replicas}
        assert sum(sum(c.values()) for c in idle.values()) == FLEET * 2

        # A small burst over the whole fleet, sampled while it runs.
        peak: dict[int, int] = {}
        total_peak = 0

        async def sample() -> None:
            nonlocal total_peak
            while True:
                now = await held(fleet)
                total_peak = max(total_peak, sum(sum(c.values()) for c in now.values()))
                for pid, purposes in now.items():
                    peak[pid] = max(peak.get(pid, 0), sum(purposes.values()))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            async with AsyncClient(fleet.addresses, token=TOKENS["acme"]) as client:
                for _ in range(2):
                    await asyncio.gather(
                        *(client.list_sessions() for _ in range(3 * FLEET)),
                        *(client.get_budget() for _ in range(FLEET)),
                    )
        finally:
            sampler.cancel()
        assert peak and max(peak.values()) <= SMALL_MOST, peak
        assert total_peak <= FLEET * SMALL_MOST <= room
        assert any(n > 2 for n in peak.values()), peak  # the burst showed

        assert await wait_idle(fleet) == {r.proc.pid: IDLE for r in fleet.replicas}
        for replica in fleet.replicas:
            assert await replica.status("readiness") == SERVING
