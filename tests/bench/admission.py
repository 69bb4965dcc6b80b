"""Benchmark 7: admission under contention. Many RunSession calls at once against one tenant's
day window that covers only some of them: admission latency (request sent -> the `started`
event or the refusal) at p50/p99, against one uncontended admission; the number admitted; and
zero overspend, watched with GetBudget all along and checked in the database at the end."""

from __future__ import annotations

import asyncio
import statistics
import time
from decimal import Decimal

import grpc
from agentplane.v1 import budget_pb2, session_pb2
from common import (
    MODEL,
    PER_SESSION_USD,
    Bench,
    Server,
    adm_token,
    interleaved,
    percentile,
    ratio,
    row,
    scalar,
    summary,
)

CALLS, QUICK_CALLS = 50, 12
ADMITS, QUICK_ADMITS = 10, 3


def sizes(quick: bool) -> tuple[int, int]:
    """(concurrent calls, sessions the window admits)."""
    return (QUICK_CALLS, QUICK_ADMITS) if quick else (CALLS, ADMITS)


async def admit(server: Server, token: str, script: str) -> tuple[float, bool]:
    """(seconds to the first event or the refusal, admitted); an admitted session is followed
    to its end."""
    call = server.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", model=MODEL),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    start = time.perf_counter()
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return time.perf_counter() - start, False
    latency = time.perf_counter() - start
    assert first.HasField("started"), first
    while (event := await call.read()) is not grpc.aio.EOF:
        if event.HasField("result"):
            assert event.result.session.state == session_pb2.SESSION_STATE_COMPLETE, event
    return latency, True


class Round:
    """One contended round on a fresh tenant window."""

    def __init__(self, calls: int, admits: int, run: int) -> None:
        self.calls, self.admits, self.run = calls, admits, run
        self.latencies: list[float] = []
        self.admitted = 0
        self.peak = Decimal(0)  # highest spent + reserved seen by GetBudget
        self.limit = Decimal(0)


async def contended(server: Server, calls: int, admits: int, run: int) -> Round:
    token = adm_token(run)
    result = Round(calls, admits, run)
    done = asyncio.Event()

    async def watch() -> None:
        while True:
            budget = await server.budgets.GetBudget(
                budget_pb2.GetBudgetRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
            result.limit = Decimal(budget.limit_usd)
            result.peak = max(result.peak, Decimal(budget.spent_usd) + Decimal(budget.reserved_usd))
            if done.is_set():
                return
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    outcomes = await asyncio.gather(*(admit(server, token, "hold") for _ in range(calls)))
    done.set()
    await watcher
    result.latencies = [latency for latency, _ in outcomes]
    result.admitted = sum(ok for _, ok in outcomes)
    # The database: one reservation per admitted session, their sum within the limit, all settled.
    tenant = f"adm{run}"
    db = server.database_url
    rows = scalar(db, "SELECT count(*) FROM reservations WHERE tenant = ?", [tenant])
    sessions = scalar(db, "SELECT count(*) FROM sessions WHERE tenant = ?", [tenant])
    held = scalar(
        db, "SELECT count(*) FROM reservations WHERE tenant = ? AND status = 'HELD'", [tenant]
    )
    assert rows == sessions == result.admitted and held == 0, (
        rows,
        sessions,
        held,
        result.admitted,
    )
    return result


async def uncontended(server: Server) -> float:
    latency, admitted = await admit(server, "solo-token", "one")
    assert admitted
    return latency


async def run(bench: Bench, server: Server) -> list[str]:
    calls, admits = sizes(bench.quick)
    runs = iter(range(bench.runs))
    rounds, alone = await interleaved(
        bench.runs,
        lambda: contended(server, calls, admits, next(runs)),
        lambda: uncontended(server),
    )
    p50 = [statistics.median(r.latencies) for r in rounds]
    p99 = [percentile(r.latencies, 99) for r in rounds]
    ms = [x * 1000 for x in alone]
    admitted = sorted({r.admitted for r in rounds})
    peak = max(r.peak for r in rounds)
    limit = rounds[0].limit
    exact = admitted == [admits]
    where = f"{calls} concurrent, {server.label}"
    return [
        row(
            f"admission latency p50, {where}",
            f"{summary([x * 1000 for x in p50], '.1f')} ms",
            f"{summary(ms, '.1f')} ms uncontended",
            ratio(p50, alone),
            "(none set)",
        ),
        row(
            f"admission latency p99, {where}",
            f"{summary([x * 1000 for x in p99], '.1f')} ms",
            f"{summary(ms, '.1f')} ms uncontended",
            ratio(p99, alone),
            "(none set)",
        ),
        row(
            f"admitted and overspend, {where}",
            f"{'/'.join(map(str, admitted))} of {calls} admitted every run; peak spent+reserved "
            f"{peak} USD",
            f"limit {limit} USD = {admits} x {PER_SESSION_USD} USD",
            f"{peak / limit:.2f}" + ("" if exact else " (admitted != expected)"),
            f"exactly {admits} admitted, <= 1.00 (zero overspend)",
        ),
    ]
