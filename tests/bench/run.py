"""`make bench`: agentplane against baselines, as ratios measured side by side in one run.

Everything is real but the model (the sandbox): the bundled CLI, agentplane as its own server
process (`python -m agentplane.server serve`) on SQLite and on PostgreSQL, a load generator
process for unary RPCs. Pairs run interleaved (A B A B ...); each figure is the median of the
runs, with min and max. The benchmarks, one module each:

    latency.py     1-3  one session: wall time, time to first event, control-plane CPU
    throughput.py  4    completed sessions/s at concurrency 1, 2, 4, 8
    unary.py       5    GetSession / GetBudget req/s and latency vs a bare grpc.aio server
    relay.py       6    events/s of a ~2,000-event session, streamed and persisted; live text
    admission.py   7    50 concurrent admissions against one budget: latency, no overspend
    scaling.py     8    memory/CPU with idle streams; figures with 10k-1M rows in the tables
    replicas.py    9    two replicas: follow lag and database load, cancel through the other
    fleet.py       9    connections per idle/busy replica; lag and cancel via PgBouncer vs direct
    flood.py       10   the metering gateway flooded from a sandbox: server RSS, health latency
    webhooks.py    11   webhook delivery latency; 10 dead receivers against another tenant

    python tests/bench/run.py [--runs N] [--quick] [--output BENCHMARKS.md]

--quick (or AGENTPLANE_BENCH_QUICK=1) runs each benchmark once with tiny sizes, on SQLite
only, and writes nothing: the test suite runs it so the benchmarks cannot rot. PostgreSQL is
AGENTPLANE_BENCH_DATABASE_URL, else AGENTPLANE_TEST_DATABASE_URL, else
postgresql://postgres@127.0.0.1:5432/test; its rows say "skipped" when it is not reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import admission
import claude_agent_sdk
import fleet
import flood
import grpc
import latency
import psycopg
import relay
import replicas
import scaling
import sqlalchemy
import throughput
import unary
import webhooks
from agentplane.server.model_double import SandboxServer
from agentplane.server.sessions.agents.launcher import BUNDLED_CLI
from common import (
    CHATTY_TEXT,
    PER_SESSION_USD,
    TEMPLATE,
    Bench,
    Server,
    load_average,
    scripts,
    short_dir,
    tenants_toml,
    via_agentplane,
    via_sdk,
)
from harness import PostgresDatabase, write_tenants

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"

SECTIONS = {
    "1-3": (
        "One session (benchmarks 1-3)",
        (
            "agentplane, every session in its bubblewrap sandbox (the default), vs `query()` of "
            "the direct SDK with the same options and script. The cold 1-turn rows come from "
            "one interleaved run of three: a sandboxed server, one alike but for "
            "AGENTPLANE_SANDBOX=none (neither with a warm pool), the direct SDK "
            f"({latency.COLD_RUNS} times the runs of the other rows, once in --quick). "
            '"sandbox cost" is sandboxed minus unsandboxed (medians); its CPU is that of '
            "every process the server ran (its own, the CLI's, bwrap's, socat's, sh's), from a "
            "cpuacct cgroup of the server's own read after each session. Control-plane CPU "
            "(means over those sessions): the sandboxed server's own against the rest of that "
            "cgroup."
        ),
    ),
    "4": (
        "Saturation throughput (benchmark 4)",
        (
            "Completed 1-turn sessions per second, closed loop (each caller starts its next "
            "session when its last one ends; 2 sessions per caller per run), agentplane vs the "
            "direct SDK at the same concurrency. The machine's cores bound both sides alike."
        ),
    ),
    "5": (
        "Unary RPCs (benchmark 5)",
        (
            f"A load generator process ({unary.TASKS} grpc.aio tasks, requests pre-serialized) "
            "against agentplane and against a bare grpc.aio server process answering the same "
            "messages from memory (no auth, no database). req/s median (min-max); p50/p99: "
            "medians over the runs."
        ),
    ),
    "6": (
        "Event relay (benchmark 6)",
        (
            f"One session whose script makes {relay.TOOL_CALLS:,} tool uses ({relay.STEPS} "
            f"assistant messages of {relay.TOOL_CALLS // relay.STEPS} parallel Reads; 2 events "
            "each). agentplane streams every event over gRPC and persists it (the "
            "result is sent after every event is written; its CLI also mirrors the transcript "
            "into the database); the baseline is the same script through the direct SDK, its "
            "messages counted as the same events by agentplane's own translation, with no gRPC, "
            "no database and no SessionStore. events/s from the first assistant message to the "
            "result. The statement counts come from SQLAlchemy's cursor and commit events on an "
            "in-process server running one such session. Live text: a session of "
            f"{relay.CHATTY_MESSAGES} answers of {CHATTY_TEXT:,} characters (a Glob between "
            "two) with include_partial_messages on (text deltas streamed, never persisted) "
            "and off, interleaved, on SQLite; events/s counts every event streamed, deltas "
            "included."
        ),
    ),
    "7": (
        "Admission under contention (benchmark 7)",
        (
            f"{admission.CALLS} RunSession calls at once against one tenant's fresh day window "
            f"that covers only {admission.ADMITS} sessions of {PER_SESSION_USD} USD (the admitted ones stay running until every admission is "
            "decided). Latency: request sent -> the `started` event or the RESOURCE_EXHAUSTED "
            "refusal, p50/p99 per run; baseline: one admission alone. Spend is watched with "
            "GetBudget every 10 ms during the run and checked in the database after it."
        ),
    ),
    "8": (
        "Scaling (benchmark 8)",
        (
            "Server process RSS (/proc VmRSS) and CPU with idle StreamSession followers of a "
            "session held RUNNING; then GetSession, ListSessions and throughput as rows are seeded "
            "straight into `sessions` and `session_events` (one event per session, all of the "
            f"queried tenant), against the same figures with {scaling.BASE} seeded rows."
        ),
    ),
    "9": (
        "Replicas (benchmark 9, PostgreSQL)",
        (
            "A second server process on the same database beside the PostgreSQL one. Follow lag: "
            "a session whose model paces 10 tool turns 0.1 s apart, followed by N StreamSession "
            "calls on its owner and N on the other replica; lag is an event's time on the owner "
            "to its receipt, over the events after all followers joined (every run pooled). "
            "Load: transactions/s (`pg_stat_database.xact_commit`, which counts autovacuum and "
            "every server's upkeep too) and reads of `session_events` "
            "(`pg_stat_user_tables` scans) over "
            f"{replicas.IDLE_WINDOW_S:g} s while N followers on the other replica follow a session "
            "that waits for the model, minus the rates with none (before and after, averaged). Cancel: CancelSession on the "
            "replica that does not run the session, sent -> answered (the session has ended). "
            "Connections (tests/bench/fleet.py): a replica's rows in `pg_stat_activity` (by its "
            "`application_name`) at idle and at the peak of a burst of sessions and reads. "
            "PgBouncer: a pair of replicas whose pools go through PgBouncer (transaction mode; "
            "LISTEN straight to PostgreSQL) against a pair straight on PostgreSQL, interleaved."
        ),
    ),
    "10": (
        "Gateway flood (benchmark 10, SQLite)",
        (
            "A session's agent posts bodies to the metering gateway from inside its sandbox "
            "(its ANTHROPIC_BASE_URL and token), six at a time: "
            f"{flood.BODIES} of 48 MiB (half with a Content-Length, half chunked; to "
            "/v1/messages, count_tokens and the MCP relay), refused 413 before they are "
            f"buffered; and {flood.PARSED} of 31 MiB of small JSON values, which the gateway "
            "reads and parses (in its worker processes) and refuses for want of a model. "
            "RSS growth: the server process's peak VmRSS during the session minus before it "
            "(per run). Health: grpc.health Check latency from the bench process, polled every "
            "10 ms through each session, against the same while a session of the same tenant "
            "runs `sleep 2`."
        ),
    ),
    "11": (
        "Webhooks (benchmark 11, SQLite)",
        (
            "Delivery latency: a session's end (its `end_time`) to the arrival of its signed "
            "`session.ended` at a healthy receiver in the bench process (verified with the "
            "Standard Webhooks library), p50/p99 over the sessions of a run, median over the "
            f"runs. Isolation: {webhooks.DEAD_RECEIVERS} endpoints of another tenant that accept "
            "connections and never answer (each attempt waits out AGENTPLANE_WEBHOOK_TIMEOUT_S, "
            "10 s, then is retried), two sessions' ends to each (one in --quick); measured after "
            "their first attempts started, against the same figures before those deliveries "
            "existed."
        ),
    ),
}


def postgres(quick: bool) -> tuple[str | None, str]:
    """(the PostgreSQL URL to use, or None with the reason)."""
    if quick:
        return None, "--quick runs on SQLite only"
    url = (
        os.environ.get("AGENTPLANE_BENCH_DATABASE_URL")
        or os.environ.get("AGENTPLANE_TEST_DATABASE_URL")
        or DEFAULT_PG
    ).strip()
    try:
        with psycopg.connect(url, connect_timeout=3):
            return url, ""
    except psycopg.Error:
        return None, f"PostgreSQL not reachable at {url}"


def revision() -> str:
    """The commit measured, and whether the server's code differed from it."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False, cwd=root, timeout=30
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "server", "migrations", "client", "protos")
    return f"agentplane {head}" + (" with uncommitted changes to its code" if dirty else "")


def versions(pg_url: str | None) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    cli = subprocess.run(
        [str(BUNDLED_CLI), "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout.strip()
    pg = "not measured"
    if pg_url:
        with psycopg.connect(pg_url) as conn:
            pg = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]  # type: ignore[index]
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), {mem} GiB, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"claude-agent-sdk {claude_agent_sdk.__version__} (CLI {cli}), grpcio {grpc.__version__}, "
        f"SQLAlchemy {sqlalchemy.__version__}, SQLite {sqlite3.sqlite_version}, PostgreSQL {pg}"
    )


async def statements_on_postgres(bench: Bench) -> str:
    assert bench.pg_url is not None
    database = PostgresDatabase(bench.pg_url)
    try:
        return await relay.count_statements(bench, database.create(), "PostgreSQL")
    finally:
        database.drop()


async def on_postgres(
    bench: Bench, rows: dict[str, list[str]], notes: dict[str, list[str]]
) -> None:
    """Benchmarks 5-8 on a fresh PostgreSQL database (dropped afterwards), or skipped rows."""
    calls, _ = admission.sizes(bench.quick)
    if bench.pg_url is None:
        for method in ("GetSession", "GetBudget"):
            rows["5"].append(bench.skipped(f"{method}, PostgreSQL", unary.GOAL))
        rows["6"].append(bench.skipped("event relay, PostgreSQL", ">= 0.8"))
        if not bench.quick:
            rows["7"].append(
                bench.skipped(
                    f"admission latency p50, {calls} concurrent, PostgreSQL", "(none set)"
                )
            )
        rows["8"].append(bench.skipped("GetSession, PostgreSQL, seeded rows", scaling.FLAT))
        rows["9"].append(bench.skipped("follow lag on another replica", "<= 20 / 100 ms"))
        return
    database = PostgresDatabase(bench.pg_url)
    url = database.create()
    server = None
    try:
        server = await Server.start(
            label="PostgreSQL",
            database_url=url,
            sandbox_url=bench.sandbox.base_url,
            tenants_file=bench.tenants_file,
            work=bench.work / "p",
        )
        await via_agentplane(server.sessions, "one")  # warm-up
        rows["5"] += await unary.run(bench, server)
        rows["6"] += await relay.run(bench, server)
        rows["6"].append(await statements_on_postgres(bench))
        rows["7"] += await admission.run(bench, server)
        lines, more = await scaling.run(bench, server)
        rows["8"] += lines
        notes["8"] += more
        rows["9"] += await replicas.run(bench, server)
        rows["9"] += await fleet.run(bench, url)
    finally:
        if server is not None:
            await server.stop()
        database.drop()


async def main(runs: int, quick: bool, output: Path | None) -> list[str]:
    started = time.perf_counter()
    code = revision()  # before the run: what was measured
    load_before = load_average()
    pg_url, pg_skipped = postgres(quick)
    _, admits = admission.sizes(quick)
    sandbox = SandboxServer(
        scripts=scripts(
            relay_tool_calls=relay.tool_calls(quick),
            relay_steps=relay.steps(quick),
            hold_s=1.5 if quick else 3.0,
        )
    )
    await sandbox.start()
    work = short_dir("apb")
    (work / TEMPLATE).mkdir()
    receivers = webhooks.Receivers()
    await receivers.start()
    tenants_file = write_tenants(
        work,
        tenants_toml(work / TEMPLATE, adm_runs=runs, adm_admits=admits),
        receivers.tenants_toml(),
    )
    bench = Bench(
        quick=quick,
        runs=runs,
        sandbox=sandbox,
        tenants_file=tenants_file,
        work=work,
        adm_admits=admits,
        pg_url=pg_url,
        pg_skipped=pg_skipped,
    )
    rows: dict[str, list[str]] = {key: [] for key in SECTIONS}
    notes: dict[str, list[str]] = {key: [] for key in SECTIONS}
    try:
        server = await Server.start(
            label="SQLite",
            database_url=f"sqlite:///{work}/b.db",
            sandbox_url=sandbox.base_url,
            tenants_file=bench.tenants_file,
            work=work / "w",
        )
        try:
            await via_agentplane(server.sessions, "one")  # warm-up: imports, connections
            await via_sdk(sandbox.base_url, "one")
            rows["1-3"] += await latency.run(bench, server)
            rows["4"] += await throughput.run(bench, server)
            rows["5"] += await unary.run(bench, server)
            rows["6"] += await relay.run(bench, server)
            rows["6"] += await relay.live_text(bench, server)
            rows["6"].append(
                await relay.count_statements(bench, f"sqlite:///{work}/statements.db", "SQLite")
            )
            if quick:  # PostgreSQL's benchmark, on SQLite so that --quick covers it
                rows["7"] += await admission.run(bench, server)
            rows["8"] += await scaling.idle_streams(bench, server)
            lines, more = await scaling.run(bench, server)
            rows["8"] += lines
            notes["8"] += more
            rows["10"] += await flood.run(bench, server)
            rows["11"] += await webhooks.run(bench, server, receivers)
        finally:
            await server.stop()
        await on_postgres(bench, rows, notes)
    finally:
        await sandbox.stop()
        await receivers.stop()
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60
    text = render(
        rows,
        notes,
        code=code,
        runs=runs,
        quick=quick,
        pg_url=pg_url,
        minutes=minutes,
        load=f"{load_before} before, {load_average()} after",
    )
    print(text)
    if output is not None:
        output.write_text(text)
    return [line for section in rows.values() for line in section]


def render(
    rows: dict[str, list[str]],
    notes: dict[str, list[str]],
    *,
    code: str,
    runs: int,
    quick: bool,
    pg_url: str | None,
    minutes: float,
    load: str,
) -> str:
    command = "make bench BENCH_ARGS=--quick" if quick else "make bench"
    args = "--quick" if quick else f"--runs {runs}"
    out = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}, {code}, on {versions(pg_url)}.",
        "",
        (
            "Sandbox model, real CLI, agentplane as its own server process (SQLite file, and a "
            f"fresh PostgreSQL database); {runs} interleaved run(s) per figure, median (min-max). "
            "Ratios matter, not absolute times: they vary between machines, and from run to run "
            "by 10-20 % on a small machine that does other work (load average, 1, 5, 15 min: "
            f"{load}); whole run {minutes:.1f} min."
        ),
        "",
        f"Command: `{command}` (`python tests/bench/run.py {args}`)",
    ]
    for key, (title, text) in SECTIONS.items():
        out += [
            "",
            f"## {title}",
            "",
            text,
            "",
            "| benchmark | agentplane | baseline | ratio (median) | goal |",
            "|---|---|---|---|---|",
            *rows[key],
        ]
        if notes[key]:
            out += ["", *(f"- {note}" for note in notes[key])]
    return "\n".join(out) + "\n"


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (at least 5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one run each, tiny sizes, SQLite only, no BENCHMARKS.md",
    )
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("AGENTPLANE_BENCH_QUICK", "") in ("1", "true")
    runs = 1 if quick else max(5, args.runs)
    asyncio.run(main(runs, quick, None if quick else args.output))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
