"""Benchmark 5: unary RPCs (GetSession, GetBudget) per second and their p50/p99 latency, from
a load generator process (loadgen.py), against agentplane and against a bare grpc.aio server
(bare_server.py) answering the same messages from memory."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from agentplane.v1 import budget_pb2, session_pb2
from common import AUTH, HERE, TOKENS, Bench, Server, free_port, ratio, row, summary, via_agentplane

TASKS = 8  # concurrent grpc.aio callers in the load generator
GOAL = ">= 0.5"
PATHS = {
    "GetSession": "/agentplane.v1.SessionService/GetSession",
    "ListSessions": "/agentplane.v1.SessionService/ListSessions",
    "GetBudget": "/agentplane.v1.BudgetService/GetBudget",
}


def durations(bench: Bench) -> tuple[float, float]:
    """(warm-up, measured) seconds of one load phase."""
    return (0.1, 0.3) if bench.quick else (0.3, 1.5)


def phase(
    target: str, method: str, request: bytes, bench: Bench, token: str = TOKENS["acme"]
) -> dict[str, Any]:
    warmup, duration = durations(bench)
    return {
        "target": target,
        "method": PATHS[method],
        "request_hex": request.hex(),
        "token": token,
        "tasks": TASKS,
        "warmup_s": warmup,
        "duration_s": duration,
    }


async def load(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the phases in a load generator process; one result per phase."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec:
        json.dump({"phases": phases}, spec)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "loadgen.py"),
            spec.name,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
    finally:
        Path(spec.name).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed with exit code {proc.returncode}")
    results = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    for p, r in zip(phases, results, strict=True):
        if r["errors"]:
            raise RuntimeError(
                f"{p['method']} on {p['target']}: {r['errors']} errors, e.g. {r['first_error']}"
            )
    return results


def cell(results: list[dict[str, Any]]) -> str:
    rps = [r["rps"] for r in results]
    p50 = statistics.median(r["p50_ms"] for r in results)
    p99 = statistics.median(r["p99_ms"] for r in results)
    return f"{summary(rps, '.0f')} req/s; p50 {p50:.2f} ms, p99 {p99:.2f} ms"


async def canned_requests(server: Server) -> tuple[dict[str, bytes], dict[str, str]]:
    """The requests of the benchmark and agentplane's answers to them (the bare server's
    canned messages)."""
    done = await via_agentplane(server.sessions, "one")
    requests = {
        "GetSession": session_pb2.GetSessionRequest(session_id=done.session_id),
        "ListSessions": session_pb2.ListSessionsRequest(page_size=50),
        "GetBudget": budget_pb2.GetBudgetRequest(),
    }
    answers = {
        "GetSession": await server.sessions.GetSession(requests["GetSession"], metadata=AUTH),
        "ListSessions": await server.sessions.ListSessions(requests["ListSessions"], metadata=AUTH),
        "GetBudget": await server.budgets.GetBudget(requests["GetBudget"], metadata=AUTH),
    }
    return (
        {k: v.SerializeToString() for k, v in requests.items()},
        {k: v.SerializeToString().hex() for k, v in answers.items()},
    )


async def start_bare(
    canned: dict[str, str], folder: Path
) -> tuple[asyncio.subprocess.Process, str]:
    path = folder / "canned.json"
    path.write_text(json.dumps(canned))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "bare_server.py"), str(port), str(path)
    )
    target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
    return proc, target


async def run(bench: Bench, server: Server) -> list[str]:
    requests, canned = await canned_requests(server)
    bare, bare_target = await start_bare(canned, bench.work)
    try:
        methods = ("GetSession", "GetBudget")
        phases = []
        for method in methods:
            for _ in range(bench.runs):  # A B A B ...
                phases.append(phase(server.target, method, requests[method], bench))
                phases.append(phase(bare_target, method, requests[method], bench))
        results = await load(phases)
    finally:
        bare.terminate()
        await bare.wait()
    lines = []
    for i, method in enumerate(methods):
        mine = results[i * 2 * bench.runs : (i + 1) * 2 * bench.runs]
        ours, theirs = mine[0::2], mine[1::2]
        lines.append(
            row(
                f"{method}, {server.label}",
                cell(ours),
                cell(theirs),
                ratio([r["rps"] for r in ours], [r["rps"] for r in theirs]),
                GOAL,
            )
        )
    return lines
