"""Benchmark 9, a fleet's figures: the PostgreSQL connections an idle and a busy replica hold
(`pg_stat_activity` by `application_name`), and follow lag and CancelSession through another
replica with the pools behind PgBouncer (transaction mode) against two replicas straight on
PostgreSQL, interleaved.

    python tests/bench/fleet.py [--runs N]      # these rows alone (run.py adds them to 9)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agentplane.server.model_double import SandboxServer
from agentplane.server.store.engine import create_engine, migrate
from agentplane.v1 import budget_pb2, session_pb2
from common import (
    AUTH,
    TEMPLATE,
    Bench,
    Server,
    connect,
    met,
    percentile,
    row,
    scripts,
    short_dir,
    summary,
    tenants_toml,
)
from harness import PostgresDatabase, write_tenants
from pgbouncer import running_pgbouncer
from replicas import cancel_latency, follow_lag, request

IDLE_TIMEOUT_S = 2.0  # the measured replica's AGENTPLANE_DB_IDLE_TIMEOUT_S: idle sooner
BUSY_SESSIONS = 4
BUSY_CALLS = 100
RATIO_GOAL = 1.5


def connections(url: str, pid: int) -> Counter[str]:
    """The connections server `pid` holds to PostgreSQL, by purpose."""
    prefix = f"agentplane/{socket.gethostname()}/{pid}/"
    with connect(url) as conn:
        names = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (prefix + "%",),
        ).fetchall()
    return Counter(str(name).removeprefix(prefix) for (name,) in names)


async def idle(url: str, pid: int, timeout: float = 60) -> Counter[str]:
    """Its connections once none is left from a burst (2, or what it holds after `timeout`)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        held = connections(url, pid)
        if sum(held.values()) <= 2 or loop.time() > end:
            return held
        await asyncio.sleep(0.5)


async def busy_peak(server: Server) -> int:
    """The most connections `server` holds while it runs BUSY_SESSIONS sessions and answers
    BUSY_CALLS concurrent reads, twice."""
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, sum(connections(server.database_url, server.pid).values()))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    runs = [
        server.sessions.RunSession(request("hang"), metadata=AUTH) for _ in range(BUSY_SESSIONS)
    ]
    try:
        await asyncio.gather(*(call.read() for call in runs))
        for _ in range(2):
            await asyncio.gather(
                *(
                    server.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=AUTH)
                    for _ in range(BUSY_CALLS // 2)
                ),
                *(
                    server.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=AUTH)
                    for _ in range(BUSY_CALLS // 2)
                ),
            )
    finally:
        for call in runs:
            call.cancel()
        sampling = False
        await sampler
    return peak


@contextlib.asynccontextmanager
async def pair(
    bench: Bench, name: str, database_url: str, settings: dict[str, str]
) -> AsyncIterator[tuple[Server, Server]]:
    """Two replicas on one database, with `settings`."""
    servers: list[Server] = []
    try:
        for i in (1, 2):
            servers.append(
                await Server.start(
                    label=f"PostgreSQL, {name} {i}",
                    database_url=database_url,
                    sandbox_url=bench.sandbox.base_url,
                    tenants_file=bench.tenants_file,
                    work=Path(f"{bench.work}/{name}{i}"),
                    settings=settings,
                )
            )
        yield servers[0], servers[1]
    finally:
        for server in servers:
            await server.stop()


async def run(bench: Bench, database_url: str) -> list[str]:
    """The rows, on `database_url` (a migrated PostgreSQL database)."""
    rows = []
    async with pair(
        bench, "direct", database_url, {"AGENTPLANE_DB_IDLE_TIMEOUT_S": f"{IDLE_TIMEOUT_S:g}"}
    ) as (owner, other):
        at_rest = await idle(database_url, other.pid)
        rows.append(
            row(
                "PostgreSQL connections held by an idle replica",
                f"{sum(at_rest.values())} ({', '.join(f'{k} {v}' for k, v in sorted(at_rest.items()))})",
                "-",
                "-",
                met("<= 2 (README: write + listen)", sum(at_rest.values()) <= 2),
            )
        )
        peak = await busy_peak(other)
        rows.append(
            row(
                f"PostgreSQL connections held by a busy replica ({BUSY_SESSIONS} sessions, "
                f"{BUSY_CALLS} concurrent reads), peak",
                str(peak),
                "-",
                "-",
                met("<= 17 (README: 5 + 5 + 4 + 2 + 1)", peak <= 17),
            )
        )
        after = await idle(database_url, other.pid)
        rows.append(
            row(
                f"... after the burst, idle again ({IDLE_TIMEOUT_S:g} s idle timeout)",
                str(sum(after.values())),
                "-",
                "-",
                met("<= 2", sum(after.values()) <= 2),
            )
        )
        try:
            bouncer_cm = running_pgbouncer(database_url)
            bouncer = bouncer_cm.__enter__()
        except pytest.skip.Exception as skipped:
            rows.append(row("through PgBouncer", f"skipped: {skipped}", "-", "-", "-"))
            return rows
        try:
            via = {"AGENTPLANE_DATABASE_LISTEN_URL": database_url}
            async with pair(bench, "pgb", bouncer.url(database_url), via) as (b_owner, b_other):
                lag_direct: list[float] = []
                lag_bounced: list[float] = []
                cancel_direct: list[float] = []
                cancel_bounced: list[float] = []
                for _ in range(bench.runs):  # interleaved: direct, PgBouncer, direct, ...
                    lag_direct += await follow_lag(owner, other, 1)
                    lag_bounced += await follow_lag(b_owner, b_other, 1)
                    cancel_direct.append(await cancel_latency(owner, other))
                    cancel_bounced.append(await cancel_latency(b_owner, b_other))
        finally:
            bouncer_cm.__exit__(None, None, None)
    for what, bounced, direct, unit in (
        ("follow lag on another replica, 1 follower, p50", lag_bounced, lag_direct, "ms"),
        ("CancelSession through another replica", cancel_bounced, cancel_direct, "s"),
    ):
        b50, d50 = percentile(bounced, 50), percentile(direct, 50)
        fmt = ".1f" if unit == "ms" else ".3f"
        rows.append(
            row(
                f"{what}, through PgBouncer vs direct, {unit}",
                summary(bounced, fmt),
                summary(direct, fmt),
                f"{b50 / d50:.2f}",
                met(f"<= {RATIO_GOAL:g}x", b50 <= RATIO_GOAL * d50),
            )
        )
    return rows


async def main(runs: int) -> None:
    """These rows alone, on a fresh database of the benchmarks' PostgreSQL."""
    pg = os.environ.get("AGENTPLANE_BENCH_DATABASE_URL") or os.environ.get(
        "AGENTPLANE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    sandbox = SandboxServer(scripts=scripts(relay_tool_calls=1, hold_s=3.0))
    await sandbox.start()
    work = short_dir("apf")
    database = PostgresDatabase(pg)
    url = database.create()
    try:
        engine = create_engine(url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()
        (work / TEMPLATE).mkdir()
        tenants = write_tenants(work, tenants_toml(work / TEMPLATE, adm_runs=1, adm_admits=1))
        bench = Bench(False, runs, sandbox, tenants, work, 1, pg)
        print("\n".join(await run(bench, url)))
    finally:
        await sandbox.stop()
        database.drop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
