"""Cancel, re-attach, idempotency and disconnects, against the real CLI."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import grpc
import pytest
from agentplane.server.domain import ErrorReason, SessionState
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.server.sessions.run.lifecycle import SessionLifecycle
from agentplane.server.sessions.run_request import RunRequest
from agentplane.v1 import budget_pb2, session_pb2
from harness import MODEL, Harness, agent_processes

pytestmark = pytest.mark.asyncio


async def read_until(call: object, kind: str) -> list[session_pb2.SessionEvent]:
    events = []
    while True:
        event = await call.read()  # type: ignore[attr-defined]
        assert event is not grpc.aio.EOF, f"stream ended before a {kind} event"
        events.append(event)
        if event.WhichOneof("kind") == kind:
            return events


async def rest_of(call: object) -> list[session_pb2.SessionEvent]:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        events.append(event)
    return events


async def stream(h: Harness, session_id: str, after_seq: int = 0, tenant: str = "acme") -> list:
    call = h.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=session_id, after_seq=after_seq),
        metadata=h.auth(tenant),
    )
    return [e async for e in call]


async def wait_gone(h: Harness) -> list[int]:
    for _ in range(600):
        left = agent_processes(h.work_dir)
        if not left:
            return left
        await asyncio.sleep(0.1)
    return left


async def test_cancel_interrupts_a_running_tool_and_kills_it(harness: Harness) -> None:
    harness.sandbox.add_script(
        "long_tool",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall("Bash", {"command": "python3 -c 'import time; time.sleep(60)'"})
                    ],
                    usage=Usage(input_tokens=500, output_tokens=50),
                ),
                Step(text="finished"),
            ]
        ),
    )
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:long_tool]] run it", model=MODEL),
        metadata=harness.auth("ops"),
    )
    events = await read_until(call, "tool_use")
    session_id = events[0].session_id
    for _ in range(600):  # the tool's own process is running
        if len(agent_processes(harness.work_dir)) >= 2:
            break
        await asyncio.sleep(0.1)
    assert len(agent_processes(harness.work_dir)) >= 2

    cancelled = await harness.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=session_id), metadata=harness.auth("ops")
    )

    assert cancelled.state == session_pb2.SESSION_STATE_ERROR
    assert cancelled.error.reason == session_pb2.ERROR_REASON_CANCELLED
    rest = await rest_of(call)
    assert rest[-1].result.session == cancelled
    assert await wait_gone(harness) == []
    window = await harness.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(), metadata=harness.auth("ops")
    )
    assert Decimal(window.reserved_usd) == 0
    assert Decimal(window.spent_usd) >= Decimal(cancelled.cost_usd) > 0  # the used turn is paid

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sessions.CancelSession(
            session_pb2.CancelSessionRequest(session_id=session_id), metadata=harness.auth("ops")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sessions.CancelSession(
            session_pb2.CancelSessionRequest(session_id=session_id), metadata=harness.auth("acme")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_cancelled_session_reports_the_usage_that_was_metered(harness: Harness) -> None:
    # One turn answered, the second stopped while the model is still thinking: the CLI's
    # interrupted result reports no tokens and counts the stopped turn.
    harness.sandbox.add_script(
        "stopped_in_turn_two",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Glob", {"pattern": "*.md"})],
                    usage=Usage(input_tokens=1000, output_tokens=100),
                ),
                Step(text="never said", delay_s=60),
            ]
        ),
    )
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:stopped_in_turn_two]] go", model=MODEL),
        metadata=harness.auth("ops"),
    )
    events = await read_until(call, "tool_result")
    tool_use_id = events[-1].tool_result.tool_use_id
    for _ in range(1200):  # the second turn's request reached the model
        if any(tool_use_id in str(r.body) for r in harness.sandbox.requests):
            break
        await asyncio.sleep(0.05)

    cancelled = await harness.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=events[0].session_id),
        metadata=harness.auth("ops"),
    )

    assert cancelled.error.reason == session_pb2.ERROR_REASON_CANCELLED
    assert cancelled.num_turns == 1
    assert (cancelled.usage.input_tokens, cancelled.usage.output_tokens) == (1000, 100)
    assert cancelled.cost_usd == "0.004500"  # claude-sonnet-4-5: $3 / $15 per Mtok
    await rest_of(call)
    stored = await harness.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=cancelled.id), metadata=harness.auth("ops")
    )
    assert stored == cancelled


async def test_a_cancel_that_meets_the_sessions_own_end_is_failed_precondition(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold the session between the agent's result and the record of its end, the window in
    # which a cancel used to answer OK with a COMPLETE session.
    ending, release = asyncio.Event(), asyncio.Event()
    record_end = SessionLifecycle._record_end

    async def held(self: SessionLifecycle, *args: object) -> object:
        ending.set()
        await release.wait()
        return await record_end(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SessionLifecycle, "_record_end", held)
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="finish first", model=MODEL),
        metadata=harness.auth("ops"),
    )
    session_id = (await call.read()).session_id
    await asyncio.wait_for(ending.wait(), 60)
    live = harness.app.sessions.capacity.live[session_id]
    cancel = asyncio.ensure_future(
        harness.sessions.CancelSession(
            session_pb2.CancelSessionRequest(session_id=session_id), metadata=harness.auth("ops")
        )
    )
    await asyncio.wait_for(live.cancel_requested.wait(), 10)
    release.set()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cancel
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended (COMPLETE)" in (caught.value.details() or "")
    final = (await rest_of(call))[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE and final.result


async def test_cancelling_an_idle_session_ends_it_before_it_starts(harness: Harness) -> None:
    tenant = harness.app.tenants.tenants["acme"]
    admission = await harness.app.sessions.start(
        tenant, RunRequest(prompt="never runs", model=MODEL)
    )
    assert admission.live is not None
    admission.live.request_cancel(ErrorReason.CANCELLED)  # before the run task got a turn
    events = [e async for e in admission.events]
    assert [e.kind.value for e in events] == ["started", "result"]
    session = await harness.app.sessions.get(tenant, admission.session_id)
    assert session.state is SessionState.ERROR and session.error_reason is ErrorReason.CANCELLED
    assert session.start_time is None
    assert not [r for r in harness.sandbox.requests if "never runs" in str(r.body)]


async def test_stream_session_replays_from_any_point(harness: Harness) -> None:
    events = await harness.run(prompt="replay me")
    session_id = events[0].session_id
    assert await stream(harness, session_id) == events
    assert await stream(harness, session_id, after_seq=2) == events[2:]
    assert await stream(harness, session_id, after_seq=len(events)) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(harness, session_id, tenant="globex")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(harness, session_id, after_seq=-1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_watchers_each_see_every_event_once_in_order(harness: Harness) -> None:
    steps = [
        Step(tool_calls=[ToolCall("Glob", {"pattern": f"*{i}*"}) for i in range(3)], delay_s=0.3)
        for _ in range(3)
    ]
    harness.sandbox.add_script("busy", Script(steps=[*steps, Step(text="done")]))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:busy]] go", model=MODEL),
        metadata=harness.auth("acme"),
    )
    first = await call.read()
    watchers = [asyncio.create_task(stream(harness, first.session_id)) for _ in range(5)]
    own = [first, *await rest_of(call)]
    seen = await asyncio.gather(*watchers)
    assert own[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert len([e for e in own if e.HasField("tool_use")]) == 9
    for events in seen:
        assert events == own


async def test_a_repeated_request_id_reattaches_instead_of_paying_twice(harness: Harness) -> None:
    request_id = str(uuid.uuid4())
    first = await harness.run(prompt="once only", request_id=request_id, labels={"rid": "a"})
    again = await harness.run(prompt="once only", request_id=request_id, labels={"rid": "a"})
    assert again == first
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run(prompt="something else", request_id=request_id)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert first[0].session_id in caught.value.details()


async def test_concurrent_requests_with_one_request_id_start_one_session(harness: Harness) -> None:
    request_id = str(uuid.uuid4())
    runs = await asyncio.gather(
        *(
            harness.run("globex", prompt="together", request_id=request_id, labels={"rid": "c"})
            for _ in range(4)
        )
    )
    assert len({events[0].session_id for events in runs}) == 1
    assert all(events == runs[0] for events in runs)
    listed = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(labels={"rid": "c"}), metadata=harness.auth("globex")
    )
    assert len(listed.sessions) == 1


async def test_a_caller_that_goes_away_with_continue_leaves_the_session_running(
    harness: Harness,
) -> None:
    harness.sandbox.add_script("slowish", Script(steps=[Step(text="still done", delay_s=1.5)]))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:slowish]] go",
            model=MODEL,
            on_disconnect=session_pb2.ON_DISCONNECT_CONTINUE,
        ),
        metadata=harness.auth("acme"),
    )
    first = await call.read()
    call.cancel()
    events = await stream(harness, first.session_id)
    assert events[0] == first
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert events[-1].result.session.result == "still done"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_a_transient_model_failure_is_retried_and_resumed(harness: Harness) -> None:
    from agentplane.server.model_double import HttpFailure

    harness.sandbox.add_script(
        "flaky",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Glob", {"pattern": "*.txt"})],
                    usage=Usage(input_tokens=1000, output_tokens=100),
                ),
                Step(
                    text="found it",
                    usage=Usage(input_tokens=1200, output_tokens=30),
                    failures=[
                        HttpFailure(529, should_retry=False),
                        HttpFailure(500, should_retry=False),
                    ],
                ),
            ]
        ),
    )
    events = await harness.run(prompt="[[sandbox:flaky]] look around")

    retries = [e.retrying for e in events if e.HasField("retrying")]
    assert [r.attempt for r in retries] == [2, 3]
    assert "529" in retries[0].reason and "500" in retries[1].reason
    assert all(r.delay_ms >= 0 for r in retries)
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE
    assert final.result == "found it"
    # The finished tool turn was not re-run: one Glob, and step 0 was asked for once.
    assert len([e for e in events if e.HasField("tool_use")]) == 1
    step0 = [r for r in harness.sandbox.find(script="flaky") if r.step == 0]
    assert len(step0) == 1
    # Paid once: the two successful responses, priced by the CLI (sonnet: $3/$15 per Mtok).
    expected = Decimal("0.003") + Decimal("0.0015") + Decimal("0.0036") + Decimal("0.00045")
    assert Decimal(final.cost_usd) == expected
    assert final.usage.input_tokens == 2200 and final.usage.output_tokens == 130


async def test_a_permanent_failure_ends_after_the_configured_attempts(harness: Harness) -> None:
    from agentplane.server.model_double import HttpFailure

    harness.sandbox.add_script(
        "down",
        Script(
            steps=[
                Step(
                    fail_always=HttpFailure(503, should_retry=False, message="down for maintenance")
                )
            ]
        ),
    )
    events = await harness.run(prompt="[[sandbox:down]] hello")
    assert len([e for e in events if e.HasField("retrying")]) == 2  # 3 attempts in all
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_MODEL_API_ERROR
    assert "503" in final.error.message
    assert len(harness.sandbox.find(script="down")) == 3


async def test_a_client_error_is_not_retried(harness: Harness) -> None:
    from agentplane.server.model_double import HttpFailure

    # 401: a bad key will not get better by asking again. (The CLI itself re-sends a 400
    # a few times, so a 400 would not show whether *we* retried.)
    harness.sandbox.add_script(
        "bad", Script(steps=[Step(fail_always=HttpFailure(401, should_retry=False))])
    )
    events = await harness.run(prompt="[[sandbox:bad]] hello")
    assert not [e for e in events if e.HasField("retrying")]
    assert events[-1].result.session.error.reason == session_pb2.ERROR_REASON_MODEL_API_ERROR
    assert len(harness.sandbox.find(script="bad")) == 1


async def test_a_killed_cli_is_retried_and_the_session_completes(harness: Harness) -> None:
    import os
    import signal

    harness.sandbox.add_script(
        # Step 1 answers too: whether the retry resumes (the SDK may have mirrored the
        # prompt before the kill) or starts afresh, the session must complete.
        "crash",
        Script(
            steps=[
                Step(text="survived", delay_s=2.0, usage=Usage(input_tokens=100, output_tokens=10)),
                Step(text="survived", usage=Usage(input_tokens=100, output_tokens=10)),
            ]
        ),
    )
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:crash]] go", model=MODEL),
        metadata=harness.auth("acme"),
    )
    await read_until(call, "system")  # the CLI is up
    for _ in range(1200):  # and waiting for the model
        if harness.sandbox.find(script="crash"):
            break
        await asyncio.sleep(0.05)
    victims = agent_processes(harness.work_dir)
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    rest = await rest_of(call)
    retries = [e.retrying for e in rest if e.HasField("retrying")]
    assert len(retries) == 1 and retries[0].attempt == 2, rest
    assert "CLI" in retries[0].reason
    final = rest[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, rest
    assert final.result == "survived"
    assert await wait_gone(harness) == []


async def test_recovery_does_not_close_a_session_whose_lease_was_renewed(harness: Harness) -> None:
    # Another server saw the lease expired, but the owner renewed it before that server's
    # closing UPDATE: the UPDATE checks the lease itself, so the session stays the owner's.
    from agentplane.server.sessions.run.ending import write_end
    from agentplane.server.store import sessions as repo
    from agentplane.server.store.engine import sessionmaker

    harness.sandbox.add_script("held", Script(steps=[Step(text="late", delay_s=3.0)]))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:held]] wait", model=MODEL),
        metadata=harness.auth(),
    )
    session_id = (await call.read()).session_id
    db = sessionmaker(harness.app.engine)
    for _ in range(1200):
        async with db() as s:
            seen = await repo.get_session(s, "acme", session_id)
        if seen is not None and seen.state is SessionState.RUNNING:
            break
        await asyncio.sleep(0.05)
    assert seen is not None and seen.state is SessionState.RUNNING
    stale_now = seen.start_time  # as if the recovering server looked before the renewal
    final = seen.evolve(state=SessionState.ERROR, error_reason=ErrorReason.INTERRUPTED)
    async with db.begin() as s:
        assert (
            await write_end(s, final, expect=SessionState.RUNNING, lease_expired_by=stale_now)
            is None
        )
    last = None
    while (event := await call.read()) is not grpc.aio.EOF:
        last = event
    assert last is not None and last.result.session.state == session_pb2.SESSION_STATE_COMPLETE
