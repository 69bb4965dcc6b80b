"""Replicas on one PostgreSQL database behave as one: a cancel taken by any of them stops
the session wherever it runs, and followers on any of them get its events as they are
committed (two real servers in this process, one database). Each test runs with the
replicas straight on PostgreSQL and with their pools through PgBouncer in transaction
mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy
from agentplane.server.model_double import Script, Step, ToolCall
from agentplane.server.store.notify import EVENTS_CHANNEL, Bus, Listener
from agentplane.v1 import budget_pb2, session_pb2
from harness import MODEL, Harness, error_details, start_harness, stop_harness
from pgbouncer import routed

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["direct", "pgbouncer"])
async def replicas(
    database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two replicas, straight on PostgreSQL or with their pools through PgBouncer in
    transaction mode (their LISTEN connections straight to PostgreSQL)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share a PostgreSQL database (SQLite serves one server)")
    url, route = routed(database_url, request.param, request)
    # A short lease: renewal, the fallback for a missed NOTIFY, comes every 2 s. Not
    # shorter: a loaded machine may keep a server from renewing for a few seconds, and the
    # other would then close its running sessions INTERRUPTED.
    owner = await start_harness(url, lease_ttl_s=6, **route)
    other = await start_harness(url, lease_ttl_s=6, **route)
    for h in (owner, other):
        h.sandbox.add_script("held", Script(steps=[Step(hang=True)]))
    yield owner, other
    await stop_harness(other)
    await stop_harness(owner)


async def running_on(h: Harness, tenant: str = "acme") -> tuple[grpc.aio.UnaryStreamCall, str]:
    """A session that waits for the model forever, RUNNING on `h`; its call and id."""
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:held]] wait", model=MODEL),
        metadata=h.auth(tenant),
    )
    while True:
        event = await call.read()
        if (
            event.HasField("state_change")
            and event.state_change.to_state == session_pb2.SESSION_STATE_RUNNING
        ):
            return call, event.session_id


async def final_event(call: grpc.aio.UnaryStreamCall) -> session_pb2.SessionEvent:
    last = None
    while (event := await call.read()) is not grpc.aio.EOF:
        last = event
    assert last is not None
    return last


async def test_a_cancel_through_another_replica_interrupts_the_session(
    replicas: tuple[Harness, Harness],
) -> None:
    owner, other = replicas
    assert owner.app.notifications is not None
    await asyncio.wait_for(owner.app.notifications.listening.wait(), 10)
    call, session_id = await running_on(owner)

    cancelled = await other.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=session_id), metadata=other.auth()
    )
    assert cancelled.state == session_pb2.SESSION_STATE_ERROR
    assert cancelled.error.reason == session_pb2.ERROR_REASON_CANCELLED
    final = (await final_event(call)).result.session
    assert final.error.reason == session_pb2.ERROR_REASON_CANCELLED
    # Once ended, a second cancel on either replica is refused the same way.
    for h in (owner, other):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.sessions.CancelSession(
                session_pb2.CancelSessionRequest(session_id=session_id), metadata=h.auth()
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(caught.value)["ErrorInfo"].reason == "FAILED_PRECONDITION"


async def test_a_cancel_whose_notification_was_missed_is_found_at_lease_renewal(
    replicas: tuple[Harness, Harness],
) -> None:
    owner, other = replicas
    listener = next(t for t in owner.app._background if t.get_name() == "notifications")
    listener.cancel()  # the owner hears no NOTIFY now
    call, session_id = await running_on(owner)
    cancelled = await other.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=session_id), metadata=other.auth()
    )
    assert cancelled.error.reason == session_pb2.ERROR_REASON_CANCELLED
    assert (await final_event(call)).result.session.state == session_pb2.SESSION_STATE_ERROR


async def test_another_tenant_cannot_cancel_through_any_replica(
    replicas: tuple[Harness, Harness],
) -> None:
    owner, other = replicas
    call, session_id = await running_on(owner)
    for h in (owner, other):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.sessions.CancelSession(
                session_pb2.CancelSessionRequest(session_id=session_id), metadata=h.auth("globex")
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    call.cancel()  # on_disconnect CANCEL ends it


def tool_steps(n: int, *, sleep_s: float) -> Script:
    """`n` Bash tool turns that each sleep `sleep_s`, then an answer."""
    return Script(
        steps=[
            *(
                Step(tool_calls=[ToolCall("Bash", {"command": f"sleep {sleep_s}"})])
                for _ in range(n)
            ),
            Step(text="all done"),
        ]
    )


async def collect(call: grpc.aio.UnaryStreamCall) -> list[session_pb2.SessionEvent]:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def event_reads(h: Harness) -> list[str]:
    """Every statement `h` runs against the events table, from now on."""
    seen: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM events" in statement:
            seen.append(statement)

    sqlalchemy.event.listen(h.app.engine.sync_engine, "before_cursor_execute", count)
    return seen


async def test_followers_on_another_replica_share_one_pushed_read(
    replicas: tuple[Harness, Harness],
) -> None:
    owner, other = replicas
    assert other.app.notifications is not None
    await asyncio.wait_for(other.app.notifications.listening.wait(), 10)
    owner.sandbox.add_script("tools", tool_steps(4, sleep_s=0.3))
    call = owner.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:tools]] go", model=MODEL),
        metadata=owner.auth("ops"),
    )
    first = await call.read()
    session_id = first.session_id
    # What the followers' replica is told: one notification per committed batch.
    notified: list[str] = []
    bus = Bus()
    bus.subscribe(
        EVENTS_CHANNEL, lambda p: notified.append(p) if p.startswith(session_id) else None
    )
    listener = Listener(other.app.settings.direct_url, bus)
    listening = asyncio.create_task(listener.run())
    await asyncio.wait_for(listener.listening.wait(), 10)
    reads = event_reads(other)
    followers = [
        other.sessions.StreamSession(
            session_pb2.StreamSessionRequest(session_id=session_id), metadata=other.auth("ops")
        )
        for _ in range(20)
    ]
    streams = await asyncio.gather(*(collect(f) for f in followers))
    owners = [first, *await collect(call)]
    listening.cancel()

    assert owners[-1].HasField("result")
    assert owners[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert sum(e.HasField("tool_use") for e in owners) == 4
    for stream in streams:  # every follower: every event, in order, to the result
        assert [e.seq for e in stream] == [e.seq for e in owners]
        assert stream[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    # Twenty followers cost one read per commit (and the first), not twenty.
    assert len(notified) >= 4
    assert len(reads) <= len(notified) + 2, (len(reads), len(notified))


async def test_every_follower_on_another_replica_ends_with_the_result(
    replicas: tuple[Harness, Harness],
) -> None:
    """Sessions end while many followers on another replica join at every moment: each
    follower ends with the `result` event, none short of it."""
    owner, other = replicas
    owner.sandbox.add_script("brief", Script(steps=[Step(text="brief", delay_s=0.4)]))
    calls = [
        owner.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="[[sandbox:brief]] go", model=MODEL),
            metadata=owner.auth("ops"),
        )
        for _ in range(6)
    ]
    ids = [(await c.read()).session_id for c in calls]

    async def follow_later(session_id: str, delay_s: float) -> list[session_pb2.SessionEvent]:
        await asyncio.sleep(delay_s)
        return await collect(
            other.sessions.StreamSession(
                session_pb2.StreamSessionRequest(session_id=session_id), metadata=other.auth("ops")
            )
        )

    followers = [follow_later(i, k * 0.05) for i in ids for k in range(25)]
    streams, _ = await asyncio.gather(
        asyncio.gather(*followers), asyncio.gather(*(collect(c) for c in calls))
    )
    for stream in streams:
        assert stream[-1].HasField("result"), [e.WhichOneof("kind") for e in stream]
        assert [e.seq for e in stream] == list(range(1, len(stream) + 1))


async def budget_of(h: Harness) -> tuple[str, str]:
    budget = await h.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=h.auth("ops"))
    return budget.reserved_usd, budget.spent_usd


async def test_getbudget_on_another_replica_follows_each_reservation_and_settlement(
    replicas: tuple[Harness, Harness],
) -> None:
    """GetBudget answers from memory, yet a reservation or settlement committed on any
    replica shows on every other once notified; and with notifications lost it reads."""
    owner, other = replicas
    assert other.app.notifications is not None
    await asyncio.wait_for(other.app.notifications.listening.wait(), 10)
    idle = await budget_of(other)
    assert await budget_of(other) == idle  # now known in memory
    reads = other.app.budgets.reads.reads

    call, _ = await running_on(owner, "ops")
    reserved = await until_changed(other, idle)  # told of the reservation
    assert reserved[0] != idle[0]
    assert await budget_of(other) == reserved
    call.cancel()  # ends CANCELLED: settled
    settled = await until_changed(other, reserved)
    assert settled[0] == idle[0]
    assert other.app.budgets.reads.reads - reads <= 4  # one read per change, not per call

    # Deaf (its listener stopped), the replica reads every time: never a stale answer.
    next(t for t in other.app._background if t.get_name() == "notifications").cancel()
    await asyncio.sleep(0.1)
    call, _ = await running_on(owner, "ops")
    assert (await budget_of(other))[0] != settled[0]
    call.cancel()


async def until_changed(h: Harness, was: tuple[str, str]) -> tuple[str, str]:
    for _ in range(3000):
        now = await budget_of(h)
        if now != was:
            return now
        await asyncio.sleep(0.01)
    raise AssertionError(f"the budget stayed {was}")
