"""Callers cannot starve each other, or running sessions, of database connections: a call
that waits too long for a connection or a statement is answered UNAVAILABLE (reason
DATABASE_UNAVAILABLE), never INTERNAL, and running sessions write through a pool of their
own, so they finish whatever callers do to the main one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest
from agentplane.server.model_double import Script, Step
from agentplane.server.store.outages import NO_CONNECTION, TOO_SLOW
from agentplane.v1 import session_pb2
from harness import MODEL, Harness, error_details, start_harness, stop_harness
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def h(database_url: str) -> AsyncIterator[Harness]:
    # Short, for the waits these tests cause; not sub-second: every statement of the server
    # (its sessions' writes too) is held to them, and a loaded machine slows some.
    harness = await start_harness(database_url, db_pool_timeout_s=2, db_statement_timeout_s=2)
    harness.sandbox.add_script("steady", Script(steps=[Step(text="steady done", delay_s=1.5)]))
    yield harness
    await stop_harness(harness)


async def unavailable(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert error_details(caught.value)["ErrorInfo"].reason == "DATABASE_UNAVAILABLE"
    return caught.value


async def test_an_exhausted_pool_answers_unavailable_and_running_sessions_finish(
    h: Harness,
) -> None:
    run = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:steady]] go", model=MODEL),
        metadata=h.auth(),
    )
    session_id = (await run.read()).session_id
    # Every connection of the callers' pool is taken (as by slow calls of some tenant).
    held = contextlib.AsyncExitStack()
    pool = h.app.engine.pool
    for _ in range(pool.size() + pool._max_overflow):  # type: ignore[attr-defined]
        await held.enter_async_context(h.app.engine.connect())
    try:
        err = await unavailable(
            h.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=h.auth("globex"))
        )
        assert err.details() == NO_CONNECTION
        # The running session ends COMPLETE meanwhile: its events and end are written.
        events = []
        while (event := await run.read()) is not grpc.aio.EOF:
            events.append(event)
        assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    finally:
        await held.aclose()
    # Once connections are free again, the database holds the whole session.
    streamed = h.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=session_id), metadata=h.auth()
    )
    persisted = [e async for e in streamed]
    assert [e.seq for e in persisted] == list(range(1, events[-1].seq + 1))
    listed = await h.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=h.auth())
    assert session_id in [s.id for s in listed.sessions]


async def test_a_statement_past_its_timeout_answers_unavailable(h: Harness) -> None:
    if not h.database_url.startswith("postgresql"):
        pytest.skip("statement timeouts are PostgreSQL's (SQLite waits on its busy timeout)")
    url = make_url(h.database_url).set(drivername="postgresql")
    async with await psycopg.AsyncConnection.connect(url.render_as_string(False)) as lock:
        # An operator's long transaction holds the sessions table.
        await lock.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        err = await unavailable(
            h.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=h.auth())
        )
        assert err.details() == TOO_SLOW
        await lock.rollback()
    # The lock gone, the same call is served again (it raises otherwise).
    await h.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=h.auth())
