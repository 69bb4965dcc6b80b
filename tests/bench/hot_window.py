"""Benchmark 9 (rows): one tenant's admissions at once, the agents' start kept out. The
admission's database work (`sessions.admission.write_admission`: the hold on the tenant's
day window, then the session and its `started` event) for 50 sessions of one tenant at
once, from 5 processes (replicas, 10 each, started together once their pools are warm) on
one database, against one admission alone; each timed from its call to its return. Beside
it, 50 admissions of 50 tenants at once: the same load without a shared window row. No
agent starts: what is measured is how the tenant's admissions share its window row.

Run alone: `python tests/bench/hot_window.py [DATABASE_URL]` (default: a SQLite file).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

from agentplane.server.domain import Event, EventKind, Session, SessionState, utcnow
from agentplane.server.sessions.admission import write_admission
from agentplane.server.sessions.replicas.leases import LeaseConfig
from agentplane.server.store import ledger
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from agentplane.server.tenants import Tenant
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import met, percentile, row

CONCURRENT, REPLICAS, ALONE = 50, 5, 30
GOAL = 5.0  # p99 at most this many times one alone's


def tenant(name: str = "") -> Tenant:
    return Tenant(
        name=name or f"hot{uuid.uuid4().hex[:8]}",
        token_sha256=frozenset(),
        anthropic_api_key_env="X",
        allowed_tools=("Read",),
        system_prompt=None,
        daily_limit_usd=Decimal(1000),
        max_session_budget_usd=Decimal(1),
        max_turns=3,
        max_concurrent_sessions=10_000,
    )


async def admit(db: async_sessionmaker[AsyncSession], t: Tenant, leases: LeaseConfig) -> float:
    """One admission's database work; its seconds."""
    now = utcnow()
    session = Session(
        id=str(uuid.uuid4()),
        tenant=t.name,
        state=SessionState.IDLE,
        create_time=now,
        max_budget_usd=Decimal("0.5"),
        max_turns=3,
        allowed_tools=("Read",),
    )
    started = Event(session.id, 1, now, EventKind.STARTED, {"session": session.to_json()})
    start = time.perf_counter()
    await write_admission(db, t, session, started, request_hash="h", leases=leases)
    return time.perf_counter() - start


async def worker(database_url: str, tenant_name: str, count: int, distinct: bool) -> None:
    """One replica's part: `count` admissions at once when told "go" on stdin (after its
    pool is warm); their seconds printed as JSON. `distinct`: each of another tenant."""
    engine = create_engine(database_url, purpose="bench")
    try:
        db = sessionmaker(engine)
        leases = LeaseConfig(owner="bench", ttl_s=3600)
        t = tenant(tenant_name)
        await asyncio.gather(*(admit(db, tenant() if distinct else t, leases) for _ in range(2)))
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        took = await asyncio.gather(
            *(admit(db, tenant() if distinct else t, leases) for _ in range(count))
        )
        print(json.dumps(took), flush=True)
    finally:
        await engine.dispose()


async def at_once(database_url: str, tenant_name: str, distinct: bool) -> list[float]:
    """CONCURRENT admissions started together in REPLICAS processes; their seconds."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--worker",
            database_url,
            tenant_name,
            str(CONCURRENT // REPLICAS),
            "distinct" if distinct else "one",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(REPLICAS)
    ]
    for p in procs:
        assert p.stdout is not None
        assert (await p.stdout.readline()).strip() == b"ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    took: list[float] = []
    for p in procs:
        out, _ = await p.communicate()
        took += json.loads(out.decode().strip().splitlines()[-1])
    return took


async def measure(
    database_url: str, rounds: int
) -> tuple[list[float], list[float], list[float], bool, float]:
    """(seconds alone, at once of one tenant, at once of as many tenants, every hold of
    the one tenant accounted for in its window, this process's CPU seconds per admission
    alone)."""
    engine = create_engine(database_url, purpose="bench")
    try:
        await migrate(engine)
        db = sessionmaker(engine)
        leases = LeaseConfig(owner="bench", ttl_s=3600)
        t = tenant()
        await admit(db, t, leases)  # warm-up
        cpu = time.process_time()
        alone = [await admit(db, t, leases) for _ in range(ALONE)]
        cpu = (time.process_time() - cpu) / ALONE
        one: list[float] = []
        many: list[float] = []
        for _ in range(rounds):
            one += await at_once(database_url, t.name, distinct=False)
            many += await at_once(database_url, t.name, distinct=True)
        admitted = 1 + ALONE + rounds * (CONCURRENT + 2 * REPLICAS)
        async with db() as s:
            window = await ledger.get_window(s, t.name, utcnow().date().isoformat())
        exact = window is not None and (window.reserved_usd, window.holds) == (
            Decimal("0.5") * admitted,
            admitted,
        )
        return alone, one, many, exact, cpu
    finally:
        await engine.dispose()


async def run(database_url: str, label: str, rounds: int = 3) -> list[str]:
    alone, one, many, exact, cpu = await measure(database_url, rounds)
    ms, solo, control = ([v * 1000 for v in vs] for vs in (one, alone, many))
    p99, solo_p99 = percentile(ms, 99), percentile(solo, 99)
    # The machine's floor: the admissions' own CPU (the caller's side only: the database's
    # is on top) spread over every core; the last of them cannot return sooner.
    cores = os.cpu_count() or 1
    floor = CONCURRENT * cpu * 1000 / cores
    return [
        row(
            f"admission p50 / p99, {CONCURRENT} at once of one tenant from {REPLICAS} "
            f"replica processes, agents' start kept out, {label}, ms",
            f"{percentile(ms, 50):.1f} / {p99:.1f}",
            f"alone {percentile(solo, 50):.1f} / {solo_p99:.1f}; {CONCURRENT} tenants at once "
            f"{percentile(control, 50):.1f} / {percentile(control, 99):.1f}; CPU "
            f"{cpu * 1000:.1f} ms each (caller's side), so {CONCURRENT} on {cores} cores "
            f"take >= {floor:.0f} ms ({floor / solo_p99:.0f}x alone's p99)",
            f"{p99 / solo_p99:.1f}x",
            met(f"p99 <= {GOAL:g}x alone; holds exact", p99 <= GOAL * solo_p99 and exact),
        )
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    url, name, count, kind = sys.argv[2:6]
    asyncio.run(worker(url, name, int(count), kind == "distinct"))
elif __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{tempfile.mkdtemp()}/hot.db"
    label = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    for line in asyncio.run(run(url, label)):
        print(line)
