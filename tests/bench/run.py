"""`make bench`: agentplane vs the direct SDK, as ratios measured side by side in one run.

Both sides use the real bundled CLI against the sandbox model. agentplane runs as its own
server process (SQLite), so its CPU can be read from /proc apart from the CLIs it spawns
(they are its children: their CPU shows as its cutime/cstime once reaped). Pairs run
interleaved (A B A B ...); each figure is the median of the runs, with min and max.

    python tests/bench/run.py [--runs N] [--quick] [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import claude_agent_sdk
import grpc
from agentplane.server.sandbox import SandboxServer, Script, Step, ToolCall, Usage
from agentplane.server.sessions.cli_env import SessionDirs, cli_environment
from agentplane.server.sessions.runner import BUNDLED_CLI
from agentplane.v1 import session_pb2, session_pb2_grpc
from claude_agent_sdk import AssistantMessage, ClaudeAgentOptions, ResultMessage, query

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' own helpers
from harness import MODEL, TOKENS, short_dir, tenants_toml
from test_server_process import free_port

SCRIPTS = {
    "one": Script(steps=[Step(text="done", usage=Usage(input_tokens=500, output_tokens=20))]),
    "tools": Script(steps=[
        *[Step(tool_calls=[ToolCall("Glob", {"pattern": f"*{i}*"})],
               usage=Usage(input_tokens=500, output_tokens=20)) for i in range(3)],
        Step(text="done", usage=Usage(input_tokens=600, output_tokens=20)),
    ]),
}
AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)


@dataclass
class Sample:
    wall_s: float
    first_s: float


def cpu_of(pid: int) -> tuple[float, float]:
    """(own CPU s, reaped children's CPU s) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(fields[i]) / tick for i in (11, 12, 13, 14))
    return utime + stime, cutime + cstime


async def via_agentplane(stub: session_pb2_grpc.SessionServiceStub, script: str) -> Sample:
    start = time.perf_counter()
    first = None
    call = stub.RunSession(
        session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", model=MODEL), metadata=AUTH
    )
    async for event in call:
        if first is None and event.WhichOneof("kind") in ("assistant_text", "tool_use"):
            first = time.perf_counter() - start
        if event.HasField("result"):
            assert event.result.session.state == session_pb2.SESSION_STATE_COMPLETE, event
    return Sample(time.perf_counter() - start, first or 0.0)


async def via_sdk(base_url: str, script: str, workspace: Path) -> Sample:
    dirs = SessionDirs(short_dir("apb") / "s")
    dirs.create()
    env = cli_environment(dirs, base_url=base_url, api_key="bench", extra={"CLAUDE_CODE_MAX_RETRIES": "0"})
    options = ClaudeAgentOptions(
        tools=["Read", "Glob", "Grep"], allowed_tools=["Read", "Glob", "Grep"],
        system_prompt="You are acme's assistant.", max_turns=8, max_budget_usd=1.0, model=MODEL,
        cwd=str(dirs.cwd), env=env, cli_path=str(BUNDLED_CLI), setting_sources=[],
    )
    start = time.perf_counter()
    first = None
    async for message in query(prompt=f"[[sandbox:{script}]] go", options=options):
        if first is None and isinstance(message, AssistantMessage):
            first = time.perf_counter() - start
        if isinstance(message, ResultMessage):
            assert not message.is_error, message
    return Sample(time.perf_counter() - start, first or 0.0)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


async def interleaved(
    runs: int, a: Callable[[], Awaitable[Sample]], b: Callable[[], Awaitable[Sample]]
) -> tuple[list[Sample], list[Sample]]:
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(await a())
        theirs.append(await b())
    return ours, theirs


async def main(runs: int, output: Path | None) -> list[str]:
    sandbox = SandboxServer(scripts=SCRIPTS)
    await sandbox.start()
    work = short_dir("apb")
    (work / "tpl").mkdir()
    (work / "tenants.toml").write_text(tenants_toml(work / "tpl"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    env.update(
        AGENTPLANE_LISTEN=f"127.0.0.1:{port}", AGENTPLANE_DATABASE_URL=f"sqlite:///{work}/b.db",
        AGENTPLANE_TENANTS_FILE=str(work / "tenants.toml"), AGENTPLANE_WORK_DIR=str(work / "w"),
        AGENTPLANE_TEST_ACME_KEY="bench", ANTHROPIC_BASE_URL=sandbox.base_url,
        AGENTPLANE_LOG_LEVEL="WARNING", AGENTPLANE_CLI_MAX_RETRIES="0",
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentplane.server", "serve", env=env
    )
    lines: list[str] = []
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        await asyncio.wait_for(channel.channel_ready(), 30)
        await asyncio.sleep(2)  # readiness checks
        stub = session_pb2_grpc.SessionServiceStub(channel)
        await via_agentplane(stub, "one")  # warm-up: imports, first connection, migrations
        await via_sdk(sandbox.base_url, "one", work)

        lines += [
            "| benchmark | agentplane (s) | direct SDK (s) | ratio (median) | goal |",
            "|---|---|---|---|---|",
        ]
        for script, label in (("one", "1-turn session, wall"), ("tools", "3-tool-turn session, wall")):
            ours, theirs = await interleaved(
                runs, lambda s=script: via_agentplane(stub, s), lambda s=script: via_sdk(sandbox.base_url, s, work)
            )
            a, b = [x.wall_s for x in ours], [x.wall_s for x in theirs]
            lines.append(f"| {label} | {summary(a)} | {summary(b)} | "
                         f"{statistics.median(a) / statistics.median(b):.2f} | <= 1.05 (cold) |")
            if script == "one":
                fa, fb = [x.first_s for x in ours], [x.first_s for x in theirs]
                lines.append(f"| time to first agent event | {summary(fa)} | {summary(fb)} | "
                             f"{statistics.median(fa) / statistics.median(fb):.2f} | <= 0.4 (warm pool, not built) |")

        own0, kids0 = cpu_of(server.pid)
        for _ in range(runs):
            await via_agentplane(stub, "one")
        own1, kids1 = cpu_of(server.pid)
        per_server = (own1 - own0) / runs
        per_cli = (kids1 - kids0) / runs
        lines.append(f"| control-plane CPU per session | {per_server:.3f} CPU-s | CLI {per_cli:.3f} CPU-s | "
                     f"{per_server / per_cli:.2f} | <= 0.05 |")
        await channel.close()
    finally:
        server.terminate()
        await server.wait()
        await sandbox.stop()
    header = [
        "# Benchmarks",
        "",
        (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, claude-agent-sdk {claude_agent_sdk.__version__}; "
        f"sandbox model, real CLI, agentplane server process on SQLite; {runs} interleaved runs "
        "per figure, median (min-max)."),
        "",
        f"Command: `make bench` (`python tests/bench/run.py --runs {runs}`)",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if output is not None:
        output.write_text(text)
    return lines


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one run each, no BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    runs = 1 if args.quick else max(5, args.runs)
    asyncio.run(main(runs, None if args.quick else args.output))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
