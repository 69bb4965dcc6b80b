"""Benchmark 6: event relay. A session whose script makes ~2,000 events (1,000 tool uses),
streamed and persisted by agentplane, against the same script's messages received with the
direct SDK and counted as the same events (agentplane's own translation), with no gRPC and no
database: the cost of relaying and persisting, end to end. Also: the events persisted equal the
events streamed, how many database statements and commits one such session makes, and what
live text costs: a session of long answers with text deltas on against the same with them off."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from common import (
    Bench,
    Sample,
    Server,
    interleaved,
    ratio,
    row,
    scalar,
    summary,
    via_agentplane,
    via_sdk,
)
from harness import start_harness, stop_harness
from sqlalchemy import event

TOOL_CALLS, QUICK_TOOL_CALLS = 1000, 25
# Four assistant messages of 250 tool uses: with all 1,000 in one message, agentplane's CLI
# writes a transcript-mirror message over the SDK's 1 MiB read buffer and the session fails.
STEPS = 4
CHATTY_MESSAGES = STEPS * 5  # the live-text session's answers (common.chatty_script)


def tool_calls(quick: bool) -> int:
    return QUICK_TOOL_CALLS if quick else TOOL_CALLS


def steps(quick: bool) -> int:
    return 1 if quick else STEPS


async def run(bench: Bench, server: Server) -> list[str]:
    ours, theirs = await interleaved(
        bench.runs,
        lambda: via_agentplane(server.sessions, "relay"),
        lambda: via_sdk(bench.sandbox.base_url, "relay"),
    )
    persisted = [
        scalar(
            server.database_url,
            "SELECT count(*) FROM session_events WHERE session_id = ?",
            [s.session_id],
        )
        for s in ours
    ]
    events = ours[0].agent_events
    assert all(s.agent_events == events for s in ours + theirs), (ours, theirs)
    a, b = [s.relay_rate for s in ours], [s.relay_rate for s in theirs]
    streamed = [s.streamed for s in ours]
    same = all(p == s for p, s in zip(persisted, streamed, strict=True))
    return [
        row(
            f"event relay, {server.label} ({events:,} agent events)",
            f"{summary(a, '.0f')} events/s streamed + persisted",
            f"{summary(b, '.0f')} events/s (direct SDK, no gRPC, no DB)",
            ratio(a, b),
            ">= 0.8",
        ),
        row(
            f"events persisted = streamed, {server.label}",
            f"{min(persisted):,}-{max(persisted):,} persisted",
            f"{min(streamed):,}-{max(streamed):,} streamed",
            ratio(sum(persisted), sum(streamed)) if same else "MISMATCH",
            "1.00 every run",
        ),
    ]


async def live_text(bench: Bench, server: Server) -> list[str]:
    """The `chatty` script (long answers) with include_partial_messages on and off: events/s
    streamed (text deltas included) and the session's wall time."""
    on, off = await interleaved(
        bench.runs,
        lambda: via_agentplane(server.sessions, "chatty", partial=True),
        lambda: via_agentplane(server.sessions, "chatty"),
    )
    assert all(s.deltas for s in on) and not any(s.deltas for s in off), (on, off)
    persisted = [
        scalar(
            server.database_url,
            "SELECT count(*) FROM session_events WHERE session_id = ?",
            [s.session_id],
        )
        for s in on
    ]
    # The deltas are live only: what is persisted is what a session without them streams.
    same = all(p == s.streamed - s.deltas for p, s in zip(persisted, on, strict=True))
    rate_on = [s.streamed / max(s.wall_s - s.first_s, 1e-9) for s in on]
    rate_off = [s.streamed / max(s.wall_s - s.first_s, 1e-9) for s in off]
    wall_on, wall_off = [s.wall_s for s in on], [s.wall_s for s in off]
    deltas = on[0].deltas
    return [
        row(
            f"live text, {server.label} ({deltas:,} text deltas, {off[0].streamed} events)",
            f"{summary(rate_on, '.0f')} events/s with deltas (deltas included)"
            + ("" if same else "; PERSISTED DELTAS"),
            f"{summary(rate_off, '.0f')} events/s without",
            ratio(rate_on, rate_off),
            "(none set)",
        ),
        row(
            f"live text, session wall time, {server.label}",
            f"{summary(wall_on)} s with deltas",
            f"{summary(wall_off)} s without",
            ratio(wall_on, wall_off),
            "(none set)",
        ),
    ]


def _statement_kind(sql: str) -> str:
    write = re.match(r"\s*(INSERT INTO|UPDATE|DELETE FROM)\s+\"?(\w+)", sql, re.IGNORECASE)
    if write:
        return f"{write.group(1).split()[0].upper()} {write.group(2)}"
    read = re.match(r"\s*SELECT\b.*?\bFROM\s+\"?(\w+)", sql, re.IGNORECASE | re.DOTALL)
    if read:
        return f"SELECT {read.group(1)}"
    return sql.split(None, 1)[0].upper() if sql.strip() else "?"


async def count_statements(bench: Bench, database_url: str, label: str) -> str:
    """One relay session on an in-process server with SQLAlchemy's cursor and commit events
    counted: what the relay costs the database, statement by statement."""
    h = await start_harness(database_url)
    try:
        h.sandbox.scripts.update(bench.sandbox.scripts)
        await via_agentplane(h.sessions, "one")  # warm-up: connections, first statements
        statements: Counter[str] = Counter()
        commits = 0

        def on_execute(conn: Any, cursor: Any, sql: str, params: Any, ctx: Any, many: bool) -> None:
            statements[_statement_kind(sql)] += 1

        def on_commit(conn: Any) -> None:
            nonlocal commits
            commits += 1

        # Both pools: callers' (admission) and the running sessions' (events, the end).
        assert h.app.upkeep_engine is not None
        engines = [h.app.engine.sync_engine, h.app.upkeep_engine.sync_engine]
        for engine in engines:
            event.listen(engine, "before_cursor_execute", on_execute)
            event.listen(engine, "commit", on_commit)
        try:
            sample: Sample = await via_agentplane(h.sessions, "relay")
        finally:
            for engine in engines:
                event.remove(engine, "before_cursor_execute", on_execute)
                event.remove(engine, "commit", on_commit)
    finally:
        await stop_harness(h)
    total = sum(statements.values())
    top = ", ".join(f"{n:,} {kind}" for kind, n in statements.most_common(4))
    return row(
        f"DB work per relay session, {label} ({sample.streamed:,} events)",
        f"{commits:,} commits, {total:,} statements: {top}",
        f"{sample.streamed:,} events",
        f"{total / sample.streamed:.2f} statements/event",
        "batched: no commit or statement per event",
    )
