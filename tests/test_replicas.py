"""Replicas on one PostgreSQL database behave as one: a cancel taken by any of them stops
the session wherever it runs (two real servers in this process, one database)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from agentplane.server.sandbox import Script, Step
from agentplane.v1 import session_pb2
from harness import MODEL, Harness, error_details, start_harness, stop_harness

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[tuple[Harness, Harness]]:
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share a PostgreSQL database (SQLite serves one server)")
    # A short lease: renewal, the fallback for a missed NOTIFY, comes every 0.5 s.
    owner = await start_harness(database_url, lease_ttl_s=1.5)
    other = await start_harness(database_url, lease_ttl_s=1.5)
    for h in (owner, other):
        h.sandbox.add_script("held", Script(steps=[Step(hang=True)]))
    yield owner, other
    await stop_harness(other)
    await stop_harness(owner)


async def running_on(h: Harness) -> tuple[grpc.aio.UnaryStreamCall, str]:
    """A session that waits for the model forever, RUNNING on `h`; its call and id."""
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:held]] wait", model=MODEL),
        metadata=h.auth(),
    )
    while True:
        event = await call.read()
        if event.HasField("state_change") and event.state_change.to_state == session_pb2.SESSION_STATE_RUNNING:
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
    assert owner.app.cancels is not None
    await asyncio.wait_for(owner.app.cancels.listening.wait(), 10)
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
                session_pb2.CancelSessionRequest(session_id=session_id), metadata=h.auth())
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(caught.value)["ErrorInfo"].reason == "FAILED_PRECONDITION"


async def test_a_cancel_whose_notification_was_missed_is_found_at_lease_renewal(
    replicas: tuple[Harness, Harness],
) -> None:
    owner, other = replicas
    listener = next(t for t in owner.app._background if t.get_name() == "cancels")
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
                session_pb2.CancelSessionRequest(session_id=session_id), metadata=h.auth("globex"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    call.cancel()  # on_disconnect CANCEL ends it
