"""Drain on SIGTERM, recovery after kill -9, a database that goes away: real processes,
real signals."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import grpc
import psycopg
import pytest
from agentplane.server.domain import TokenUsage
from agentplane.server.model_double import SandboxServer, Script, Step, ToolCall, Usage
from agentplane.server.money.pricing import PriceTable
from agentplane.server.store.engine import create_engine, sessionmaker
from agentplane.server.store.models import (
    BudgetWindowRow,
    EventRow,
    ModelRequestInFlightRow,
    ModelRequestRow,
    SessionRow,
)
from agentplane.v1 import session_pb2
from grpc_health.v1 import health_pb2
from harness import MODEL, TOKENS, agent_processes, tenants_toml, write_tenants
from replicas_harness import Replica, start_server
from sqlalchemy import select

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)
PRICES = PriceTable.load()


@dataclass
class World:
    """A sandbox model, a tenants file and a work dir shared by the servers of a test."""

    sandbox: SandboxServer
    work: Path
    database_url: str
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def start(self, **env: str) -> Replica:
        server = await start_server(self.work, self.database_url, self.sandbox.base_url, **env)
        self.processes.append(server.proc)
        return server

    async def model_requests(
        self, session_id: str
    ) -> tuple[list[ModelRequestRow], list[ModelRequestInFlightRow]]:
        """A session's settled model requests and its pending records."""
        engine = create_engine(self.database_url)
        try:
            async with sessionmaker(engine)() as db:
                settled = await db.scalars(
                    select(ModelRequestRow)
                    .where(ModelRequestRow.session_id == session_id)
                    .order_by(ModelRequestRow.id)
                )
                pending = await db.scalars(
                    select(ModelRequestInFlightRow).where(
                        ModelRequestInFlightRow.session_id == session_id
                    )
                )
                return list(settled), list(pending)
        finally:
            await engine.dispose()

    async def rows(self) -> tuple[list[SessionRow], dict[str, list[int]], list[BudgetWindowRow]]:
        engine = create_engine(self.database_url)
        try:
            async with sessionmaker(engine)() as db:
                sessions = list(await db.scalars(select(SessionRow)))
                seqs: dict[str, list[int]] = {}
                for event in await db.scalars(select(EventRow).order_by(EventRow.seq)):
                    seqs.setdefault(event.session_id, []).append(event.seq)
                windows = list(await db.scalars(select(BudgetWindowRow)))
        finally:
            await engine.dispose()
        return sessions, seqs, windows


@pytest.fixture
async def world(database_url: str, short_tmp: Path) -> AsyncIterator[World]:
    work = short_tmp
    workspace = work / "tpl"
    workspace.mkdir()
    write_tenants(work, tenants_toml(workspace))
    sandbox = SandboxServer(
        scripts={
            "quick": Script(steps=[Step(text="quick done", delay_s=1.0)]),
            "stuck": Script(steps=[Step(hang=True)]),
            "slowish": Script(steps=[Step(text="slow done", delay_s=4.0)]),
            "answered_then_stuck": Script(
                steps=[
                    Step(
                        tool_calls=[ToolCall("Glob", {"pattern": "*.txt"})],
                        usage=Usage(input_tokens=1000, output_tokens=100),
                    ),
                    Step(hang=True),
                ]
            ),
        }
    )
    await sandbox.start()
    world = World(sandbox, work, database_url)
    yield world
    for proc in world.processes:  # a failed test must not leave a server behind
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await sandbox.stop()
    assert agent_processes(work) == []


def run(server: Replica, script: str) -> grpc.aio.UnaryStreamCall:
    return server.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", model=MODEL), metadata=AUTH
    )


async def events_of(call: grpc.aio.UnaryStreamCall) -> list[session_pb2.SessionEvent]:
    """The rest of a stream (read() throughout: gRPC forbids mixing it with iteration)."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def wait_requests(sandbox: SandboxServer, n: int) -> None:
    for _ in range(2400):
        if len([r for r in sandbox.requests if r.kind == "conversation"]) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the model never got {n} requests")


GRACE_S = 6


async def test_sigterm_drains_finishes_what_it_can_and_exits_0(world: World) -> None:
    # The grace must let the quick sessions finish (their answer is 1 s away, then the CLI
    # ends them, in seconds on a loaded machine); the stuck one ends SHUTDOWN at its end.
    server = await world.start(AGENTPLANE_SHUTDOWN_GRACE_S=str(GRACE_S))
    watch = server.health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
    assert (await watch.read()).status == SERVING
    calls = [run(server, "quick"), run(server, "quick"), run(server, "stuck")]
    streams = [asyncio.create_task(events_of(c)) for c in calls]
    await wait_requests(world.sandbox, 3)

    started = asyncio.get_running_loop().time()
    server.proc.send_signal(signal.SIGTERM)
    assert (await watch.read()).status == NOT_SERVING
    assert await server.status("liveness") == SERVING  # alive while draining
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events_of(run(server, "quick"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    results = [(await s)[-1].result.session for s in streams]
    assert [r.state for r in results] == [session_pb2.SESSION_STATE_COMPLETE] * 2 + [
        session_pb2.SESSION_STATE_ERROR
    ]
    assert results[2].error.reason == session_pb2.ERROR_REASON_SHUTDOWN
    assert await asyncio.wait_for(server.proc.wait(), 15) == 0
    assert asyncio.get_running_loop().time() - started < GRACE_S + 8  # grace + a margin
    await server.channel.close()
    assert agent_processes(world.work) == []

    sessions, seqs, windows = await world.rows()
    ours = {e[0].session_id for e in [await s for s in streams]}
    for s in [s for s in sessions if s.id in ours]:
        assert seqs[s.id] == list(range(1, len(seqs[s.id]) + 1))  # persisted gap-free
    assert all(w.reserved_usd == 0 for w in windows)


async def test_a_second_signal_cuts_the_grace_short(world: World) -> None:
    server = await world.start(AGENTPLANE_SHUTDOWN_GRACE_S="60")
    stream = asyncio.create_task(events_of(run(server, "stuck")))
    await wait_requests(world.sandbox, 1)
    server.proc.send_signal(signal.SIGTERM)
    await server.wait_status(NOT_SERVING, "readiness")
    server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.proc.wait(), 15) == 0
    final = (await stream)[-1].result.session
    assert final.error.reason == session_pb2.ERROR_REASON_SHUTDOWN
    await server.channel.close()


async def kill_and_recover(
    world: World, server: Replica, call: grpc.aio.UnaryStreamCall, session_id: str
) -> list[session_pb2.SessionEvent]:
    """kill -9 `server`, start another that recovers the session; the session's events as
    the new server streams them (to the end), after which it is stopped cleanly."""
    server.proc.kill()
    await server.proc.wait()
    call.cancel()
    await server.channel.close()
    second = await world.start(AGENTPLANE_LEASE_TTL_S="2")
    watch = second.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=session_id), metadata=AUTH
    )
    events = await asyncio.wait_for(events_of(watch), 20)
    second.proc.send_signal(signal.SIGTERM)
    assert await second.proc.wait() == 0
    await second.channel.close()
    return events


async def test_after_kill_9_another_server_closes_the_session(world: World) -> None:
    first = await world.start(AGENTPLANE_LEASE_TTL_S="2")
    call = run(first, "stuck")
    started = await call.read()
    await wait_requests(world.sandbox, 1)
    events = await kill_and_recover(world, first, call, started.session_id)
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_INTERRUPTED
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    _, _, windows = await world.rows()
    assert all(w.reserved_usd == 0 for w in windows)
    assert agent_processes(world.work) == []  # the dead server's CLI was reaped too


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
async def test_any_replica_of_the_host_removes_what_a_dead_one_left(
    world: World, sandbox: str
) -> None:
    """Replicas with work dirs of their own: the next one to start, whichever, removes a
    dead one's session folders (its sandbox's tmpfs too) and kills what still runs there."""
    host, dead_dir = world.work / "host", world.work / "wa"
    common = {
        "AGENTPLANE_HOST_DIR": str(host),
        "AGENTPLANE_SANDBOX": sandbox,
        "AGENTPLANE_LEASE_TTL_S": "2",
    }
    first = await world.start(AGENTPLANE_WORK_DIR=str(dead_dir), **common)
    call = run(first, "stuck")
    session_id = (await call.read()).session_id
    await wait_requests(world.sandbox, 1)
    (folder,) = [p for p in (dead_dir / "acme").iterdir() if p.is_dir()]
    first.proc.kill()
    await first.proc.wait()
    call.cancel()
    await first.channel.close()
    assert folder.is_dir()  # nothing else would ever remove it

    other = await world.start(AGENTPLANE_WORK_DIR=str(world.work / "wb"), **common)
    assert not folder.exists()
    assert agent_processes(dead_dir) == []
    assert [p.name for p in (dead_dir / "acme").iterdir()] == []
    # The session itself is closed by recovery, as ever (so no hold outlives the test).
    watch = other.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=session_id), metadata=AUTH
    )
    final = (await asyncio.wait_for(events_of(watch), 20))[-1].result.session
    assert final.error.reason == session_pb2.ERROR_REASON_INTERRUPTED
    other.proc.send_signal(signal.SIGTERM)
    assert await other.proc.wait() == 0
    await other.channel.close()


async def test_a_killed_replica_loses_no_spend(world: World) -> None:
    # The model answered the first request (sonnet, 1,000 in / 100 out: $0.0045) and is
    # streaming the second (20,000 in / 400 out: $0.066, billed though never finished)
    # when the server is killed. Its pending record, written before it was forwarded,
    # is charged at its estimate by the server that recovers the session: the day's
    # spend covers all the model billed, and exceeds it by at most that one estimate.
    def acme_day(windows: list[BudgetWindowRow]) -> tuple[Decimal, Decimal]:
        spent = sum((w.spent_usd for w in windows if w.tenant == "acme"), Decimal(0))
        return spent, sum((w.reserved_usd for w in windows if w.tenant == "acme"), Decimal(0))

    world.sandbox.add_script(
        "answered_then_held",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Glob", {"pattern": "*.txt"})],
                    usage=Usage(input_tokens=1000, output_tokens=100),
                ),
                Step(
                    text="never finished",
                    usage=Usage(input_tokens=20_000, output_tokens=400),
                    stall_after_events=2,  # message_start and a block's start, then held
                ),
            ]
        ),
    )
    first = await world.start(AGENTPLANE_LEASE_TTL_S="2")  # (it migrates a new database)
    before, _ = acme_day((await world.rows())[2])  # the module's other tests spend too
    call = run(first, "answered_then_held")
    started = await call.read()
    await wait_requests(world.sandbox, 2)  # the second one is held
    progress = await first.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=started.session_id), metadata=AUTH
    )
    assert progress.state == session_pb2.SESSION_STATE_RUNNING
    assert Decimal(progress.cost_usd) == Decimal("0.0045") and progress.num_turns == 1
    assert progress.usage.input_tokens == 1000 and progress.usage.output_tokens == 100
    ours = [r for r in world.sandbox.requests if r.kind == "conversation"]
    billed = sum(
        (
            PRICES.price(MODEL).cost(TokenUsage(r.usage.input_tokens, r.usage.output_tokens))
            for r in ours
            if r.usage
        ),
        Decimal(0),
    )
    assert billed == Decimal("0.0705")

    final = (await kill_and_recover(world, first, call, started.session_id))[-1].result.session
    assert final.error.reason == session_pb2.ERROR_REASON_INTERRUPTED
    requests, pending = await world.model_requests(started.session_id)
    assert pending == []
    assert [r.outcome for r in requests] == ["completed", "interrupted"]
    estimate = requests[1].cost_usd  # the held request, charged at its reservation
    assert Decimal(final.cost_usd) == Decimal("0.0045") + estimate
    spent, reserved = acme_day((await world.rows())[2])
    assert reserved == 0
    assert billed <= spent - before <= billed + estimate


async def test_a_database_outage_is_ridden_out(world: World) -> None:
    if not world.database_url.startswith("postgresql"):
        pytest.skip("needs a database server whose connections can be cut")
    server = await world.start(AGENTPLANE_HEALTH_INTERVAL_S="0.5")
    name = world.database_url.rsplit("/", 1)[1]
    admin = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    )
    call = run(server, "slowish")
    first = await call.read()
    await wait_requests(world.sandbox, 1)

    await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
    )
    await server.wait_status(NOT_SERVING, "readiness", timeout=10)
    assert await server.status("liveness") == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events_of(run(server, "quick"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    await asyncio.sleep(4)  # the session ends while the database is away
    await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    await server.wait_status(SERVING, "readiness", timeout=15)
    events = [first, *await events_of(call)]
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    await admin.close()

    server.proc.send_signal(signal.SIGTERM)
    assert await server.proc.wait() == 0
    await server.channel.close()
    sessions, seqs, windows = await world.rows()
    (session,) = [s for s in sessions if s.id == first.session_id]
    assert session.state == "COMPLETE"
    assert seqs[session.id] == [e.seq for e in events]  # nothing lost
    assert all(w.reserved_usd == 0 for w in windows)


async def test_two_servers_on_one_database_share_a_budget_exactly(world: World) -> None:
    if not world.database_url.startswith("postgresql"):
        pytest.skip("replicas share PostgreSQL")
    world.sandbox.add_script(
        "hold",
        Script(
            steps=[
                Step(text="done", delay_s=2.0, usage=Usage(input_tokens=1000, output_tokens=100)),
            ]
        ),
    )
    servers = [await world.start(AGENTPLANE_MAX_SESSIONS="64") for _ in range(2)]
    auth = (("authorization", f"Bearer {TOKENS['ten']}"),)

    async def attempt(server: Replica) -> session_pb2.Session | grpc.aio.AioRpcError:
        call = server.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="[[sandbox:hold]] go", model=MODEL), metadata=auth
        )
        try:
            return (await events_of(call))[-1].result.session
        except grpc.aio.AioRpcError as exc:
            return exc

    outcomes = await asyncio.gather(*(attempt(servers[i % 2]) for i in range(50)))
    admitted = [o for o in outcomes if isinstance(o, session_pb2.Session)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(admitted) == 10 and len(refused) == 40
    assert all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
    for server in servers:
        server.proc.send_signal(signal.SIGTERM)
        assert await server.proc.wait() == 0
        await server.channel.close()
    _, _, windows = await world.rows()
    (ten,) = [w for w in windows if w.tenant == "ten"]
    assert ten.reserved_usd == 0
    assert ten.spent_usd == sum(Decimal(s.cost_usd) for s in admitted) > 0
