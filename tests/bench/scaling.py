"""Benchmark 8: scaling. The server process's memory and CPU with idle connected streams, and
how the unary figures (benchmark 5) and throughput (benchmark 4) change as the sessions and
session_events tables grow (rows seeded directly, see seed.py), with the query plans of the
server's hot queries at the largest size."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import unary
from agentplane.v1 import session_pb2
from common import (
    AUTH,
    MODEL,
    Bench,
    Server,
    connect,
    cpu_of,
    ratio,
    row,
    rss_mib,
    scalar,
    summary,
)
from seed import seed, sqlite_value
from throughput import agentplane_rate

STREAMS, QUICK_STREAMS = (0, 8, 32), (0, 2, 4)
SIZES, QUICK_SIZES = (10_000, 100_000, 1_000_000), (1_000,)
BASE = 100  # rows seeded before the baseline figures (a full page of 50 and more)
CONCURRENCY, QUICK_CONCURRENCY = 4, 1  # the throughput figure at each size
FLAT = ">= 0.90 (flat)"


async def idle_streams(bench: Bench, server: Server) -> list[str]:
    """RSS and CPU of the server with 0, 8, 32 StreamSession followers of one session that the
    sandbox holds RUNNING (its model request never answers): connected streams with nothing
    to send."""
    held = server.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:hang]] go",
            model=MODEL,
            on_disconnect=session_pb2.ON_DISCONNECT_CONTINUE,
        ),
        metadata=AUTH,
    )
    session_id = (await held.read()).session_id
    await held.read()  # RUNNING
    held.cancel()  # the caller goes; the session stays RUNNING (CONTINUE)
    window = 0.5 if bench.quick else 3.0
    followers: list[Any] = []
    figures: list[tuple[int, float, float]] = []
    try:
        for n in QUICK_STREAMS if bench.quick else STREAMS:
            while len(followers) < n:
                call = server.sessions.StreamSession(
                    session_pb2.StreamSessionRequest(session_id=session_id), metadata=AUTH
                )
                await call.read()  # connected: the replay has begun
                followers.append(call)
            await asyncio.sleep(0.5)
            cpu0, t0 = cpu_of(server.pid)[0], time.perf_counter()
            await asyncio.sleep(window)
            cpu = (cpu_of(server.pid)[0] - cpu0) / (time.perf_counter() - t0)
            figures.append((n, rss_mib(server.pid), cpu * 100))
    finally:
        for call in followers:
            call.cancel()
        await server.sessions.CancelSession(
            session_pb2.CancelSessionRequest(session_id=session_id), metadata=AUTH
        )
    lines = []
    _, rss0, cpu0_pct = figures[0]
    for n, rss, cpu in figures:
        per = f" (+{(rss - rss0) * 1024 / n:.0f} KiB/stream)" if n else ""
        lines.append(
            row(
                f"server RSS and CPU, {n} idle streams",
                f"{rss:.1f} MiB{per}, CPU {cpu:.1f} %",
                f"0 streams: {rss0:.1f} MiB, CPU {cpu0_pct:.1f} %",
                ratio(rss, rss0),
                "RSS flat (<= 1.10), CPU ~0",
            )
        )
    return lines


async def figures(bench: Bench, server: Server, requests: dict[str, bytes]) -> dict[str, Any]:
    """GetSession and ListSessions (loadgen, interleaved) and sessions/s at CONCURRENCY."""
    phases = []
    for _ in range(bench.runs):
        phases.append(unary.phase(server.target, "GetSession", requests["GetSession"], bench))
        phases.append(unary.phase(server.target, "ListSessions", requests["ListSessions"], bench))
    results = await unary.load(phases)
    c = QUICK_CONCURRENCY if bench.quick else CONCURRENCY
    rates = [
        await agentplane_rate(server, c, c if bench.quick else 2 * c) for _ in range(bench.runs)
    ]
    return {"GetSession": results[0::2], "ListSessions": results[1::2], "throughput": rates}


def elsewhere(database_url: str) -> bytes:
    """A GetSession request for a seeded session made RUNNING on another (pretend) server
    with a lease far ahead: this server has it neither live nor among the ended sessions
    it keeps in memory, so every call reads the database (the index is what is measured)."""
    session_id = str(uuid.UUID(int=1))  # seed.py's first session
    with connect(database_url) as conn:
        sql = (
            "UPDATE sessions SET state = 'RUNNING', ended_at = NULL, owner = 'elsewhere', "
            "lease_expires_at = ? WHERE id = ?"
        )
        if not database_url.startswith("sqlite"):
            sql = sql.replace("?", "%s")
        lease = datetime(2100, 1, 1, tzinfo=UTC)
        conn.execute(
            sql, (sqlite_value(lease) if database_url.startswith("sqlite") else lease, session_id)
        )
    return session_pb2.GetSessionRequest(session_id=session_id).SerializeToString()


def rows_in(server: Server) -> str:
    sessions = scalar(server.database_url, "SELECT count(*) FROM sessions")
    events = scalar(server.database_url, "SELECT count(*) FROM session_events")
    return f"{sessions:,} sessions, {events:,} events"


async def run(bench: Bench, server: Server) -> tuple[list[str], list[str]]:
    """(rows, notes) for the table sizes; the database keeps the seeded rows."""
    requests, _ = await unary.canned_requests(server)
    c = QUICK_CONCURRENCY if bench.quick else CONCURRENCY
    # The baseline: the benchmarks' own sessions and BASE seeded ones, so that ListSessions
    # returns full pages from the start.
    await asyncio.to_thread(seed, server.database_url, 0, BASE)
    seeded = BASE
    requests = {**requests, "GetSession": await asyncio.to_thread(elsewhere, server.database_url)}
    base = await figures(bench, server, requests)
    notes = [
        (
            f"{server.label} baseline (+{BASE} rows seeded, beside the benchmarks' own "
            f"sessions): {rows_in(server)}."
        )
    ]
    lines = []
    for size in QUICK_SIZES if bench.quick else SIZES:
        started = time.perf_counter()
        await asyncio.to_thread(seed, server.database_url, seeded, size - seeded)
        notes.append(
            f"{server.label} +{size:,} seeded ({time.perf_counter() - started:.0f} s): "
            f"{rows_in(server)}."
        )
        seeded = size
        now = await figures(bench, server, requests)
        for method, label in (
            ("GetSession", "GetSession"),
            ("ListSessions", "ListSessions (page of 50)"),
        ):
            ours, theirs = now[method], base[method]
            lines.append(
                row(
                    f"{label}, {server.label}, +{size:,} rows",
                    unary.cell(ours),
                    f"+{BASE} rows: " + unary.cell(theirs),
                    ratio([r["rps"] for r in ours], [r["rps"] for r in theirs]),
                    FLAT,
                )
            )
        lines.append(
            row(
                f"sessions/s at concurrency {c}, {server.label}, +{size:,} rows",
                f"{summary(now['throughput'], '.2f')} /s",
                f"+{BASE} rows: {summary(base['throughput'], '.2f')} /s",
                ratio(now["throughput"], base["throughput"]),
                FLAT,
            )
        )
    notes.append(f"Query plans at +{seeded:,} rows, {server.label}: " + plans(server))
    return lines, notes


# The server's queries on sessions and events, written out as it issues them (store/*.py).
QUERIES = {
    "GetSession": "SELECT * FROM sessions WHERE id = ? AND tenant = ?",
    "ListSessions": "SELECT * FROM sessions WHERE tenant = ? "
    "ORDER BY created_at DESC, id DESC LIMIT 51",
    "admission count": "SELECT count(*) FROM sessions WHERE tenant = ? "
    "AND state IN ('IDLE', 'RUNNING')",
    "crash recovery (every lease TTL/3)": "SELECT * FROM sessions WHERE state IN ('IDLE', "
    "'RUNNING') AND (lease_expires_at IS NULL OR lease_expires_at < ?) LIMIT 100",
    "StreamSession replay": "SELECT * FROM session_events WHERE session_id = ? AND seq > ? "
    "ORDER BY seq",
}


def plans(server: Server) -> str:
    """Each query's plan (its first line) and median time of 5 runs."""
    sqlite = server.database_url.startswith("sqlite")
    sid = "00000000-0000-0000-0000-000000000001"
    params = {
        "GetSession": [sid, "acme"],
        "ListSessions": ["acme"],
        "admission count": ["acme"],
        "crash recovery (every lease TTL/3)": [
            "2000-01-01 00:00:00.000000" if sqlite else "2000-01-01T00:00:00+00:00"
        ],
        "StreamSession replay": [sid, 0],
    }
    parts = []
    with connect(server.database_url) as conn:
        for name, sql in QUERIES.items():
            if not sqlite:
                sql = sql.replace("?", "%s")
            explain = ("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + sql
            plan = [r[-1] for r in conn.execute(explain, params[name]).fetchall()]
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                conn.execute(sql, params[name]).fetchall()
                times.append(time.perf_counter() - t0)
            parts.append(
                f"{name}: `{'; '.join(p.strip() for p in plan[:2])}` "
                f"({statistics.median(times) * 1000:.2f} ms)"
            )
    return "; ".join(parts) + "."
