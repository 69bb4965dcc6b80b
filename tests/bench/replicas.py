"""Benchmark 9: two replicas on one PostgreSQL database. Followers of a session on the replica
that does not run it against followers on its owner: the lag of each event (its time on the
owner -> received by the follower) at p50/p99 with 1, 10 and 50 followers, and the database
transactions per second that idle followers cause; and CancelSession through the other
replica, request sent -> answered (the session ended)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import grpc
from agentplane.v1 import session_pb2
from common import (
    AUTH,
    MODEL,
    Bench,
    Server,
    met,
    percentile,
    row,
    scalar,
    summary,
)

FOLLOWERS = (1, 10, 50)
LAG_P50_MS, LAG_P99_MS = 20.0, 100.0
IDLE_WINDOW_S = 10.0  # pg_stat_database flushes each backend's counts at most once a second
CANCELS = 10


def request(script: str) -> session_pb2.RunSessionRequest:
    return session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", model=MODEL)


async def _collect(call: grpc.aio.UnaryStreamCall, joined: float, lags: list[float]) -> None:
    """Lags (ms) of the events published after `joined` (a UTC timestamp)."""
    while (event := await call.read()) is not grpc.aio.EOF:
        at = dt.datetime.now(dt.UTC).timestamp()
        sent = event.time.ToDatetime(dt.UTC).timestamp()
        if sent > joined:
            lags.append((at - sent) * 1000)


async def follow_lag(owner: Server, on: Server, followers: int) -> list[float]:
    """One paced session on `owner`, followed by `followers` streams on `on`."""
    run = owner.sessions.RunSession(request("paced"), metadata=AUTH)
    first = await run.read()
    calls = [
        on.sessions.StreamSession(
            session_pb2.StreamSessionRequest(session_id=first.session_id), metadata=AUTH
        )
        for _ in range(followers)
    ]
    joined = dt.datetime.now(dt.UTC).timestamp() + 0.2  # events after every follower joined
    lags: list[float] = []
    await asyncio.gather(
        *(_collect(call, joined, lags) for call in calls), _collect(run, joined, [])
    )
    return lags


def counters(url: str) -> tuple[int, int]:
    """(transactions committed in the database, scans of the events table)."""
    commits = scalar(
        url, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    scans = scalar(
        url,
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM "
        "pg_stat_user_tables WHERE relname = 'session_events'",
    )
    return int(commits), int(scans)


async def _rate(url: str) -> tuple[float, float]:
    """Transactions/s and events-table scans/s over IDLE_WINDOW_S."""
    before, start = counters(url), time.perf_counter()
    await asyncio.sleep(IDLE_WINDOW_S)
    after, took = counters(url), time.perf_counter() - start
    return (after[0] - before[0]) / took, (after[1] - before[1]) / took


async def idle_load(
    owner: Server, other: Server
) -> tuple[tuple[float, float], dict[int, tuple[float, float]]]:
    """Transactions/s and events-table scans/s while a session on `owner` waits for the
    model, with no follower (before and after the others, averaged), and what N followers
    on `other` add to each."""
    run = owner.sessions.RunSession(request("hang"), metadata=AUTH)
    first = await run.read()
    await asyncio.sleep(4.0)  # started, and the counters flushed
    before = await _rate(owner.database_url)
    added = {}
    for n in FOLLOWERS:
        calls = [
            other.sessions.StreamSession(
                session_pb2.StreamSessionRequest(session_id=first.session_id), metadata=AUTH
            )
            for _ in range(n)
        ]
        readers = [asyncio.create_task(c.read()) for c in calls]
        await asyncio.sleep(1.5)  # joined (the replay read), and the counters flushed
        added[n] = await _rate(owner.database_url)
        for c in calls:
            c.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    after = await _rate(owner.database_url)
    base = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
    run.cancel()
    return base, {n: (r[0] - base[0], r[1] - base[1]) for n, r in added.items()}


async def cancel_latency(owner: Server, other: Server) -> float:
    run = owner.sessions.RunSession(request("hang"), metadata=AUTH)
    first = await run.read()
    while True:  # RUNNING: the CLI is up and waiting for the model
        event = await run.read()
        if (
            event.HasField("state_change")
            and event.state_change.to_state == session_pb2.SESSION_STATE_RUNNING
        ):
            break
    start = time.perf_counter()
    cancelled = await other.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=first.session_id), metadata=AUTH
    )
    took = time.perf_counter() - start
    assert cancelled.error.reason == session_pb2.ERROR_REASON_CANCELLED, cancelled
    while await run.read() is not grpc.aio.EOF:
        pass
    return took


async def run(bench: Bench, owner: Server) -> list[str]:
    """The rows, with a second replica started beside `owner` (PostgreSQL)."""
    other = await Server.start(
        label="PostgreSQL, replica 2",
        database_url=owner.database_url,
        sandbox_url=bench.sandbox.base_url,
        tenants_file=bench.tenants_file,
        work=Path(f"{bench.work}/p2"),
    )
    rows = []
    try:
        for n in FOLLOWERS:
            on_owner: list[float] = []
            on_other: list[float] = []
            for _ in range(bench.runs):  # interleaved: owner, other, owner, ...
                on_owner += await follow_lag(owner, owner, n)
                on_other += await follow_lag(owner, other, n)
            p50, p99 = percentile(on_other, 50), percentile(on_other, 99)
            rows.append(
                row(
                    f"follow lag on another replica, {n} follower(s) per replica, p50 / p99 ms",
                    f"{p50:.1f} / {p99:.1f}",
                    f"owner {percentile(on_owner, 50):.1f} / {percentile(on_owner, 99):.1f}",
                    "-",
                    met(
                        f"<= {LAG_P50_MS:g} / {LAG_P99_MS:g}",
                        p50 <= LAG_P50_MS and p99 <= LAG_P99_MS,
                    ),
                )
            )
        base, added = await idle_load(owner, other)
        counts = " / ".join(f"{n}" for n in FOLLOWERS)
        rows.append(
            row(
                f"database transactions/s added by {counts} idle followers on another replica",
                " / ".join(f"{added[n][0]:+.1f}" for n in FOLLOWERS),
                f"{base[0]:.1f} with none",
                "-",
                "independent of the count",
            )
        )
        rows.append(
            row(
                f"reads of the events table/s added by {counts} idle followers on another replica",
                " / ".join(f"{added[n][1]:+.2f}" for n in FOLLOWERS),
                f"{base[1]:.2f} with none",
                "-",
                met("independent of the count (each < 1)", max(a[1] for a in added.values()) < 1),
            )
        )
        for where, through in (("on the owner", owner), ("through another replica", other)):
            took = [await cancel_latency(owner, through) for _ in range(CANCELS)]
            rows.append(
                row(
                    f"CancelSession {where}, {CANCELS} sessions, s",
                    summary(took),
                    "-",
                    "-",
                    met("p99 < 1 s", percentile(took, 99) < 1.0),
                )
            )
    finally:
        await other.stop()
    return rows
