"""What every benchmark shares: the server process, the sandbox scripts, both ways of running a
session (through agentplane, and with the SDK directly), /proc readings and the table format."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
from agentplane.server.model_double import SandboxServer, Script, Step, ToolCall, Usage
from agentplane.server.sandbox.cli_env import SessionDirs, cli_environment
from agentplane.server.sessions.agents.launcher import BUNDLED_CLI
from agentplane.server.sessions.run.translate import to_events
from agentplane.v1 import budget_pb2_grpc, session_pb2, session_pb2_grpc
from claude_agent_sdk import AssistantMessage, ClaudeAgentOptions, ResultMessage, query
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' own helpers
from harness import MODEL, TOKENS, TomlValue, short_dir, tenant_toml
from test_server_process import free_port

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)
# Event kinds that stand for a message of the agent (the rest are agentplane's own).
AGENT_KINDS = frozenset({"assistant_text", "thinking", "tool_use", "tool_result", "system"})
USAGE = Usage(input_tokens=500, output_tokens=20)


def relay_script(tool_calls: int, steps: int) -> Script:
    """`tool_calls` parallel tool uses spread over `steps` assistant messages, then a text:
    2 events each (tool_use, tool_result). A Read of a missing file is the cheapest tool the
    CLI runs (~1 ms), so the CLI, not the tool, sets the pace."""
    per = -(-tool_calls // steps)
    calls = [
        ToolCall("Read", {"file_path": f"/nonexistent/agentplane-bench/{i}"})
        for i in range(tool_calls)
    ]
    return Script(
        steps=[
            *[Step(tool_calls=calls[i : i + per], usage=USAGE) for i in range(0, tool_calls, per)],
            Step(text="done", usage=USAGE),
        ]
    )


CHATTY_TEXT = 3200  # characters of text per message: 200 text deltas of the sandbox's 16


def chatty_script(steps: int) -> Script:
    """`steps` * 5 messages (at most 7: the bench tenant's 8 turns) of CHATTY_TEXT characters
    each, a Glob after each but the last."""
    text = ("Streaming answers arrive piece by piece. " * 80)[:CHATTY_TEXT]
    return Script(
        steps=[
            *[
                Step(text=text, tool_calls=[ToolCall("Glob", {"pattern": f"*{i}*"})], usage=USAGE)
                for i in range(min(steps * 5, 7) - 1)
            ],
            Step(text=text, usage=USAGE),
        ]
    )


def scripts(*, relay_tool_calls: int, relay_steps: int = 1, hold_s: float) -> dict[str, Script]:
    return {
        "one": Script(steps=[Step(text="done", usage=USAGE)]),
        "tools": Script(
            steps=[
                *[
                    Step(tool_calls=[ToolCall("Glob", {"pattern": f"*{i}*"})], usage=USAGE)
                    for i in range(3)
                ],
                Step(text="done", usage=Usage(input_tokens=600, output_tokens=20)),
            ]
        ),
        "relay": relay_script(relay_tool_calls, relay_steps),
        # Live text: long answers, streamed as text deltas when the request asks for them.
        "chatty": chatty_script(relay_steps),
        # Admitted sessions of the admission benchmark: alive until every admission is decided.
        "hold": Script(steps=[Step(text="done", usage=USAGE, delay_s=hold_s)]),
        # Events paced by the model (10 tool turns, 0.1 s apart): followers see each as it comes.
        "paced": Script(
            steps=[
                *[
                    Step(
                        tool_calls=[ToolCall("Glob", {"pattern": f"*{i}*"})],
                        usage=USAGE,
                        delay_s=0.1,
                    )
                    for i in range(10)
                ],
                Step(text="done", usage=USAGE),
            ]
        ),
        # A session that stays RUNNING until cancelled (the idle streams follow it).
        "hang": Script(steps=[Step(hang=True)]),
    }


# -- tenants ----------------------------------------------------------------------------------

PER_SESSION_USD = "0.1"  # the admission tenants' per-session budget
TEMPLATE = "tpl"  # acme's workspace template, in the work folder of a bench run
WARM_TOKEN = "warm-token"


def adm_token(run: int) -> str:
    return f"adm-token-{run}"


def tenants_toml(workspace: Path, *, adm_runs: int, adm_admits: int, warm: bool = True) -> str:
    """acme (limits high enough for concurrency 8 and thousands of sessions), `solo` (one
    uncontended admission at a time), `flood` (Bash, for benchmark 10), `warm` (acme with a warm pool of one agent; not with
    warm=False) and `adm0..` (one fresh budget window per run of the admission benchmark,
    admitting exactly `adm_admits` sessions of 0.1 USD)."""
    key = "AGENTPLANE_TEST_ACME_KEY"
    acme: dict[str, TomlValue] = {
        "anthropic_api_key_env": key,
        "allowed_tools": ["Read", "Glob", "Grep"],
        "system_prompt": "You are acme's assistant.",
        "daily_limit_usd": 100000.0,
        "max_session_budget_usd": 1.0,
        "max_turns": 8,
        "max_concurrent_sessions": 64,
        "workspace_template": workspace,
    }
    per_session = float(PER_SESSION_USD)
    return "\n".join(
        [
            tenant_toml("acme", TOKENS["acme"], **acme),
            tenant_toml(
                "solo",
                "solo-token",
                anthropic_api_key_env=key,
                allowed_tools=["Read"],
                daily_limit_usd=100000.0,
                max_session_budget_usd=per_session,
                max_turns=4,
                max_concurrent_sessions=64,
            ),
            # Its agents flood the gateway (benchmark 10): Bash, generous budgets.
            tenant_toml(
                "flood",
                "flood-token",
                anthropic_api_key_env=key,
                allowed_tools=["Bash"],
                daily_limit_usd=100000.0,
                max_session_budget_usd=1.0,
                max_turns=4,
                max_concurrent_sessions=8,
            ),
            # acme's policy with one agent kept started ahead of demand (the warm pool).
            *(
                [tenant_toml("warm", WARM_TOKEN, **acme, warm_pool_size=1, warm_pool_model=MODEL)]
                if warm
                else []
            ),
            *(
                tenant_toml(
                    f"adm{run}",
                    adm_token(run),
                    anthropic_api_key_env=key,
                    allowed_tools=["Read"],
                    daily_limit_usd=round(per_session * adm_admits, 1),
                    max_session_budget_usd=per_session,
                    max_turns=4,
                    max_concurrent_sessions=100,
                )
                for run in range(adm_runs)
            ),
        ]
    )


# -- the server process -----------------------------------------------------------------------


@dataclass
class Server:
    """An agentplane server process (`python -m agentplane.server serve`) and stubs to it."""

    proc: asyncio.subprocess.Process
    port: int
    database_url: str
    label: str  # "SQLite" or "PostgreSQL"
    channel: grpc.aio.Channel
    cpu: CpuGroup  # everything the process runs, its sandboxes too
    sessions: session_pb2_grpc.SessionServiceStub = field(init=False)
    budgets: budget_pb2_grpc.BudgetServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = session_pb2_grpc.SessionServiceStub(self.channel)
        self.budgets = budget_pb2_grpc.BudgetServiceStub(self.channel)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    async def start(
        cls,
        *,
        label: str,
        database_url: str,
        sandbox_url: str,
        tenants_file: Path,
        work: Path,
        settings: Mapping[str, str] | None = None,
    ) -> Server:
        """`settings`: variables over the benchmarks' own (AGENTPLANE_SANDBOX=none, say)."""
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
        env.update(
            AGENTPLANE_LISTEN=f"127.0.0.1:{port}",
            AGENTPLANE_DATABASE_URL=database_url,
            AGENTPLANE_TENANTS_FILE=str(tenants_file),
            AGENTPLANE_WORK_DIR=str(work),
            AGENTPLANE_TEST_ACME_KEY="bench",
            ANTHROPIC_BASE_URL=sandbox_url,
            AGENTPLANE_LOG_LEVEL="WARNING",
            AGENTPLANE_CLI_MAX_RETRIES="0",
            AGENTPLANE_AUTO_MIGRATE="1",
            # Benchmark 4 runs 8 sessions at once, benchmark 7 admits 50 at once.
            AGENTPLANE_MAX_SESSIONS="64",
        )
        env.update(settings or {})
        cpu = CpuGroup.make(f"agentplane-bench-{os.getpid()}-{port}")
        command = [sys.executable, "-m", "agentplane.server", "serve"]
        if cpu.path is not None:  # join the group before the server starts (and finds its own)
            command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cpu.procs), *command]
        try:
            proc = await asyncio.create_subprocess_exec(*command, env=env)
        except BaseException:
            cpu.remove()
            raise
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        server = cls(proc, port, database_url, label, channel, cpu)
        try:
            await server._wait_ready()
        except BaseException:
            await server.stop()
            raise
        return server

    async def _wait_ready(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"the {self.label} server exited with {self.proc.returncode}")
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="readiness"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the {self.label} server never became ready")

    async def sandboxed(self) -> bool:
        """Whether the server runs every session in a sandbox (health `agentplane.sandbox`)."""
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service="agentplane.sandbox"), timeout=5
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self.channel.close()
        try:
            if self.proc.returncode is None:
                self.proc.terminate()
                try:
                    await asyncio.wait_for(self.proc.wait(), 30)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
        finally:
            self.cpu.remove()


# -- /proc ------------------------------------------------------------------------------------


def cpu_of(pid: int) -> tuple[float, float]:
    """(own CPU s, reaped children's CPU s) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(fields[i]) / tick for i in (11, 12, 13, 14))
    return utime + stime, cutime + cstime


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


@dataclass(frozen=True)
class CpuGroup:
    """A cpuacct cgroup (cgroup v1) of one server process's own, for the CPU of everything
    the server runs. cpu_of's reaped-children figure misses a sandboxed CLI (~0.01 of its
    ~0.6 CPU-s show): the sandbox's processes are SIGKILLed with its cgroup, so bwrap never
    reaps the CLI's CPU into its own and on to the server's. The sandbox's cgroup lies below
    the server's, and the kernel charges CPU to every ancestor cgroup as it is used, so this
    group keeps the CPU of session cgroups removed since. `path` None: none (`why`)."""

    path: Path | None
    why: str = ""

    @classmethod
    def make(cls, name: str) -> CpuGroup:
        """A new group `name` below this process's own cpuacct cgroup."""
        if not (CPUACCT / "cpuacct.usage").is_file():
            return cls(None, f"no cgroup v1 cpuacct controller at {CPUACCT}")
        own = next(
            (
                line.split(":", 2)[2]
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if "cpuacct" in line.split(":", 2)[1].split(",")
            ),
            "/",
        )
        path = CPUACCT / own.lstrip("/") / name
        try:
            path.mkdir()
        except OSError as exc:
            return cls(None, f"cannot make a cpuacct cgroup ({exc.strerror or exc})")
        return cls(path)

    @property
    def procs(self) -> Path:
        assert self.path is not None, self.why
        return self.path / "cgroup.procs"

    def cpu_s(self) -> float:
        """CPU seconds used so far by every process that ran in the group or below it."""
        assert self.path is not None, self.why
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        """Remove the group and the (empty) groups the server left below it."""
        if self.path is None or not self.path.is_dir():
            return
        for folder in sorted(
            (p for p in self.path.rglob("*") if p.is_dir()),
            key=lambda p: len(p.parts),
            reverse=True,
        ):
            with suppress(OSError):
                folder.rmdir()
        with suppress(OSError):
            self.path.rmdir()


def rss_mib(pid: int) -> float:
    """VmRSS of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- one session, two ways --------------------------------------------------------------------


@dataclass
class Sample:
    wall_s: float  # request sent -> the end (the result)
    first_s: float  # request sent -> the first assistant message (text or tool use)
    agent_events: int = 0  # events standing for agent messages (see AGENT_KINDS)
    streamed: int = 0  # every event the caller received
    session_id: str = ""
    deltas: int = 0  # text deltas received (with partial messages), of the streamed ones

    @property
    def relay_rate(self) -> float:
        """Agent events per second, from the first assistant message to the end."""
        return self.agent_events / max(self.wall_s - self.first_s, 1e-9)


async def via_agentplane(
    stub: session_pb2_grpc.SessionServiceStub,
    script: str,
    auth: Sequence[tuple[str, str]] = AUTH,
    *,
    partial: bool = False,
) -> Sample:
    start = time.perf_counter()
    first = None
    agent = streamed = deltas = 0
    session_id = ""
    call = stub.RunSession(
        session_pb2.RunSessionRequest(
            prompt=f"[[sandbox:{script}]] go", model=MODEL, include_partial_messages=partial
        ),
        metadata=tuple(auth),
    )
    async for event in call:
        kind = event.WhichOneof("kind")
        streamed += 1
        if kind == "text_delta":
            deltas += 1
            continue
        session_id = event.session_id
        if kind in AGENT_KINDS:
            agent += 1
        if first is None and kind in ("assistant_text", "tool_use"):
            first = time.perf_counter() - start
        if event.HasField("result"):
            assert event.result.session.state == session_pb2.SESSION_STATE_COMPLETE, event
    return Sample(time.perf_counter() - start, first or 0.0, agent, streamed, session_id, deltas)


async def via_sdk(base_url: str, script: str) -> Sample:
    """The same session with claude-agent-sdk's query() (same options as acme's sessions),
    each message counted as the events agentplane's translation makes of it."""
    root = short_dir("apb")
    dirs = SessionDirs(root / "s")
    dirs.create()
    env = cli_environment(
        dirs, base_url=base_url, api_key="bench", extra={"CLAUDE_CODE_MAX_RETRIES": "0"}
    )
    options = ClaudeAgentOptions(
        tools=["Read", "Glob", "Grep"],
        allowed_tools=["Read", "Glob", "Grep"],
        system_prompt="You are acme's assistant.",
        max_turns=8,
        max_budget_usd=1.0,
        model=MODEL,
        cwd=str(dirs.cwd),
        env=env,
        cli_path=str(BUNDLED_CLI),
        setting_sources=[],
    )
    start = time.perf_counter()
    first = None
    events = 0
    try:
        async for message in query(prompt=f"[[sandbox:{script}]] go", options=options):
            events += len(to_events(message))
            if first is None and isinstance(message, AssistantMessage):
                first = time.perf_counter() - start
            if isinstance(message, ResultMessage):
                assert not message.is_error, message
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return Sample(time.perf_counter() - start, first or 0.0, events, events)


async def interleaved(runs: int, *each: Callable[[], Awaitable[T]]) -> list[list[T]]:
    """A B A B ... (or A B C A B C ...): `runs` results of each."""
    results: list[list[T]] = [[] for _ in each]
    for _ in range(runs):
        for one, out in zip(each, results, strict=True):
            out.append(await one())
    return results


async def closed_loop(concurrency: int, total: int, one: Callable[[], Awaitable[Any]]) -> float:
    """Run `total` sessions with `concurrency` callers, each starting its next session when
    its last one ended; completed sessions per second."""
    left = total

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


# -- databases --------------------------------------------------------------------------------


@contextmanager
def connect(database_url: str) -> Iterator[Any]:
    """A DB-API connection to the server's database (sqlite3 or psycopg, autocommit)."""
    if database_url.startswith("sqlite:///"):
        conn: Any = sqlite3.connect(
            database_url.removeprefix("sqlite:///"), timeout=30, isolation_level=None
        )
    else:
        conn = psycopg.connect(database_url, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def scalar(database_url: str, sql: str, params: Sequence[Any] = ()) -> Any:
    """One value; `?` placeholders (turned into %s for PostgreSQL)."""
    if not database_url.startswith("sqlite"):
        sql = sql.replace("?", "%s")
    with connect(database_url) as conn:
        return conn.execute(sql, tuple(params)).fetchone()[0]


# -- the table --------------------------------------------------------------------------------


def summary(values: Sequence[float], fmt: str = ".3f") -> str:
    """median (min-max)."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def ratio(ours: Sequence[float] | float, theirs: Sequence[float] | float) -> str:
    a = statistics.median(ours) if isinstance(ours, Sequence) else ours
    b = statistics.median(theirs) if isinstance(theirs, Sequence) else theirs
    return f"{a / b:.2f}" if b else "-"


def row(name: str, ours: str, theirs: str, ratio_: str, goal: str) -> str:
    return f"| {name} | {ours} | {theirs} | {ratio_} | {goal} |"


def met(goal: str, ok: bool) -> str:
    """The goal cell of a figure checked against its goal."""
    return f"{goal}; met: {'yes' if ok else 'no'}"


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Bench:
    """One `make bench` run: its settings and what all benchmarks share."""

    quick: bool
    runs: int
    sandbox: SandboxServer
    tenants_file: Path
    work: Path
    adm_admits: int
    pg_url: str | None  # the PostgreSQL server to create databases on, None: skipped
    pg_skipped: str = ""  # why PostgreSQL rows are skipped

    @property
    def template(self) -> Path:
        """acme's workspace template (run.py makes it)."""
        return self.work / TEMPLATE

    def skipped(self, name: str, goal: str) -> str:
        return row(name, f"skipped: {self.pg_skipped}", "-", "-", goal)
