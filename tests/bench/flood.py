"""Benchmark 10: the metering gateway flooded from inside a session's sandbox. A session's
agent posts bodies to its gateway (ANTHROPIC_BASE_URL, its own token) six at a time: 48 MiB
ones (with a Content-Length and chunked, to the Messages route, count_tokens and the MCP
relay), which the gateway refuses (413) before buffering, and 31 MiB ones of small JSON
values, which it parses (in its worker processes) and refuses for want of a model. Measured:
the server process's RSS growth over the run (peak /proc VmRSS minus before) and gRPC health
latency (Check, polled every 10 ms from the bench process), against health latency while a
session of the same tenant runs `sleep 2` and posts nothing."""

from __future__ import annotations

import asyncio
import statistics
import textwrap
import time

from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2
from common import MODEL, Bench, Server, percentile, ratio, row, rss_mib
from grpc_health.v1 import health_pb2, health_pb2_grpc

TOKEN = "flood-token"  # common.tenants_toml's `flood` tenant (Bash)
BODIES, QUICK_BODIES = 24, 6  # per run, posted six at a time
PARSED, QUICK_PARSED = 8, 2
# Refused bodies: at most the two chunked ones being read, up to the 32 MiB cap. Parsed
# ones: two being read (each briefly twice as it is joined) and one copy on its way to a
# parser process.
GOAL_RSS = {"big": "< +100 MiB", "parsed": "<= +128 MiB (4 x 32 MiB)"}
GOAL_P99 = "< 100 ms"

# Inside the sandbox: `big` bodies of 48 MiB, or `parsed` bodies of 31 MiB of small JSON
# values (`{"metadata":[1,1,...]}`), six threads at a time.
AGENT = textwrap.dedent(
    """
    import http.client, os, sys, threading, urllib.parse
    from concurrent.futures import ThreadPoolExecutor
    kind, count = sys.argv[1], int(sys.argv[2])
    base = urllib.parse.urlsplit(os.environ["ANTHROPIC_BASE_URL"])
    key = os.environ["ANTHROPIC_API_KEY"]
    routes = ["/v1/messages", "/v1/messages/count_tokens", "/mcp/crm/mcp"]
    def big():
        block = b" " * (1 << 20)
        for _ in range(48):
            yield block
    def parsed():
        yield b'{"metadata":['
        block = b"1," * (1 << 19)
        for _ in range(31):
            yield block
        yield b"1]}"
    def post(i):
        conn = http.client.HTTPConnection(base.hostname, base.port, timeout=300)
        headers = {"x-api-key": key, "content-type": "application/json"}
        if kind == "big" and i % 2:
            conn.request("POST", routes[i % 3], body=big(), headers=headers, encode_chunked=True)
        elif kind == "big":
            headers["content-length"] = str(48 << 20)
            conn.request("POST", routes[i % 3], body=big(), headers=headers)
        else:
            headers["content-length"] = str(13 + 31 * (1 << 20) + 3)
            conn.request("POST", "/v1/messages", body=parsed(), headers=headers)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(post, range(count)))
    print("STATUSES", " ".join(map(str, statuses)))
    """
)


def _script(bench: Bench, name: str, command: str) -> str:
    bench.sandbox.add_script(
        name,
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Bash", {"command": command, "timeout": 600000})],
                    usage=Usage(input_tokens=500, output_tokens=20),
                ),
                Step(text="done", usage=Usage(input_tokens=600, output_tokens=20)),
            ]
        ),
    )
    return f"[[sandbox:{name}]] go"


async def _session(server: Server, prompt: str) -> str:
    """Run a session of the `flood` tenant; its tool's output."""
    call = server.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=prompt, model=MODEL),
        metadata=(("authorization", f"Bearer {TOKEN}"),),
    )
    out = []
    async for event in call:
        if event.HasField("tool_result"):
            out.append(event.tool_result.content)
        if event.HasField("result"):
            assert event.result.session.state == session_pb2.SESSION_STATE_COMPLETE, event
    return "\n".join(out)


async def _measured(server: Server, prompt: str) -> tuple[str, float, list[float]]:
    """Run the session while health is polled: (its output, peak RSS growth MiB, health
    latencies in seconds)."""
    health = health_pb2_grpc.HealthStub(server.channel)
    before = rss_mib(server.pid)
    peak = before
    latencies: list[float] = []
    task = asyncio.create_task(_session(server, prompt))
    while not task.done():
        start = time.perf_counter()
        await health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=60)
        latencies.append(time.perf_counter() - start)
        peak = max(peak, rss_mib(server.pid))
        await asyncio.sleep(0.01)
    return await task, peak - before, latencies


def _p(latencies: list[float], p: float) -> float:
    return percentile(latencies, p) * 1000


async def run(bench: Bench, server: Server) -> list[str]:
    bodies = QUICK_BODIES if bench.quick else BODIES
    parsed = QUICK_PARSED if bench.quick else PARSED
    prompts = {
        "big": _script(bench, "flood-big", f"python3 - big {bodies} <<'EOF'\n{AGENT}\nEOF"),
        "parsed": _script(
            bench, "flood-parsed", f"python3 - parsed {parsed} <<'EOF'\n{AGENT}\nEOF"
        ),
        "idle": _script(bench, "flood-idle", "sleep 2; echo idle"),
    }
    results: dict[str, list[tuple[str, float, list[float]]]] = {k: [] for k in prompts}
    for _ in range(bench.runs):
        for kind, prompt in prompts.items():
            results[kind].append(await _measured(server, prompt))
    for kind, expected in (("big", "413"), ("parsed", "400")):
        for out, _, _ in results[kind]:
            statuses = out.rsplit("STATUSES", 1)[1].split()
            assert statuses and set(statuses) == {expected}, (kind, out)

    idle = [lat for _, _, lats in results["idle"] for lat in lats]
    idle_cell = f"no flood: p50 {_p(idle, 50):.1f} ms, p99 {_p(idle, 99):.1f} ms"
    lines = []
    for kind, label in (
        ("big", f"{bodies} x 48 MiB refused (413)"),
        ("parsed", f"{parsed} x 31 MiB of JSON values parsed"),
    ):
        growth = [g for _, g, _ in results[kind]]
        lats = [lat for _, _, ls in results[kind] for lat in ls]
        before = rss_mib(server.pid)
        lines.append(
            row(
                f"gateway flood, {label}: server RSS growth",
                f"+{statistics.median(growth):.1f} (+{min(growth):.1f}-+{max(growth):.1f}) MiB",
                f"{before:.1f} MiB after the runs",
                ratio(before + statistics.median(growth), before),
                GOAL_RSS[kind],
            )
        )
        lines.append(
            row(
                f"gateway flood, {label}: health latency",
                f"p50 {_p(lats, 50):.1f} ms, p99 {_p(lats, 99):.1f} ms ({len(lats)} checks)",
                idle_cell,
                ratio(_p(lats, 99), _p(idle, 99)),
                GOAL_P99,
            )
        )
    return lines
