"""A bounded soak: many short sessions, a few at a time, leave nothing behind."""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import pytest
from agentplane.v1 import budget_pb2, session_pb2
from harness import Harness, agent_processes

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

SESSIONS = (
    120  # 15 rounds of AT_ONCE: enough for a leak to show in the fds and RSS, and CI stays short
)
AT_ONCE = 8


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_many_short_sessions_leak_nothing(harness: Harness, database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the soak runs once, on SQLite, to keep CI short")
    gate = asyncio.Semaphore(AT_ONCE)
    states: list[int] = []
    # Warm up at full concurrency: pools that grow to their working size are not leaks.
    await asyncio.gather(*(harness.run("ops", prompt="warm up") for _ in range(AT_ONCE)))
    fds_before, rss_before = open_fds(), rss_mib()

    async def one(i: int) -> None:
        async with gate:
            events = await harness.run("ops", prompt=f"soak {i}")
            states.append(events[-1].result.session.state)

    started = asyncio.get_running_loop().time()
    half = SESSIONS // 2
    await asyncio.gather(*(one(i) for i in range(half)))
    fds_half = open_fds()
    await asyncio.gather(*(one(i) for i in range(half, SESSIONS)))
    elapsed = asyncio.get_running_loop().time() - started
    fds_after, rss_after = open_fds(), rss_mib()
    print(
        f"\nsoak: {SESSIONS} sessions, {AT_ONCE} at a time, {elapsed:.1f} s "
        f"({SESSIONS / elapsed:.1f}/s); test process RSS {rss_before:.0f} -> {rss_after:.0f} MiB; "
        f"open fds {fds_before} -> {fds_half} (half) -> {fds_after}"
    )
    assert states == [session_pb2.SESSION_STATE_COMPLETE] * SESSIONS
    assert agent_processes(harness.work_dir) == []
    # Pools may still grow to their working size (a SQLite connection holds 3 fds: the
    # database, its WAL and shared memory; HTTP keep-alive sockets come in pairs here, the
    # sandbox being in this process). A leak grows per session: 100 sessions per half.
    assert fds_after <= fds_half + 15 and fds_after <= fds_before + 30
    window = await harness.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(), metadata=harness.auth("ops")
    )
    assert Decimal(window.reserved_usd) == 0
    assert harness.app.sessions.live_count == 0
