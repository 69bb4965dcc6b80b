"""RunSession end to end: real gRPC, real CLI, real database, the sandbox model."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import grpc
import pytest
from agentplane.server.api.convert import event_to_proto
from agentplane.server.model_double import HttpFailure, Script, Step, ToolCall, Usage
from agentplane.server.store.engine import sessionmaker
from agentplane.server.store.sessions import list_events
from agentplane.v1 import budget_pb2, session_pb2
from harness import Harness, agent_processes, error_details

pytestmark = pytest.mark.asyncio


def kinds(events: list[session_pb2.SessionEvent]) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


async def budget(h: Harness, tenant: str = "acme") -> budget_pb2.Budget:
    return await h.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=h.auth(tenant))


async def test_a_session_uses_a_tool_in_its_workspace_and_answers(harness: Harness) -> None:
    harness.sandbox.add_script(
        "grep_word",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall("Grep", {"pattern": "magic word", "output_mode": "content"})
                    ],
                    usage=Usage(input_tokens=2000, output_tokens=100),
                ),
                Step(
                    text="The magic word is PAPAYA.",
                    usage=Usage(input_tokens=2600, output_tokens=40),
                ),
            ]
        ),
    )
    before = await budget(harness)

    events = await harness.run(
        prompt="[[sandbox:grep_word]] What is the magic word in hello.txt?",
        labels={"team": "search"},
    )

    k = kinds(events)
    assert k[0] == "started" and k[1] == "state_change" and k[-1] == "result"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    session_id = events[0].session_id
    assert all(e.session_id == session_id for e in events)
    assert events[0].started.session.state == session_pb2.SESSION_STATE_IDLE
    assert events[1].state_change.to_state == session_pb2.SESSION_STATE_RUNNING

    use = next(e for e in events if e.HasField("tool_use"))
    result = next(e for e in events if e.HasField("tool_result"))
    answer = [e for e in events if e.HasField("assistant_text")][-1]
    assert use.tool_use.name == "Grep"
    assert json.loads(use.tool_use.input_json)["pattern"] == "magic word"
    assert result.tool_result.tool_use_id == use.tool_use.tool_use_id
    assert not result.tool_result.is_error
    assert "PAPAYA" in result.tool_result.content
    assert use.seq < result.seq < answer.seq < events[-1].seq
    assert answer.assistant_text.text == "The magic word is PAPAYA."

    final = events[-1].result.session
    assert final.id == session_id
    assert final.state == session_pb2.SESSION_STATE_COMPLETE
    assert not final.HasField("error")
    assert Decimal(final.cost_usd) > 0
    assert final.num_turns >= 2
    assert final.usage.input_tokens >= 4600 and final.usage.output_tokens >= 140
    assert final.result == "The magic word is PAPAYA."
    assert final.labels == {"team": "search"}
    assert final.sdk_session_id
    assert final.HasField("end_time") and final.HasField("start_time")

    # What was persisted is exactly what was streamed.
    async with sessionmaker(harness.app.engine)() as db:
        persisted = await list_events(db, session_id)
    assert [event_to_proto(e) for e in persisted] == events
    got = await harness.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=session_id), metadata=harness.auth()
    )
    assert got == final

    after = await budget(harness)
    assert Decimal(after.spent_usd) - Decimal(before.spent_usd) == Decimal(final.cost_usd)
    assert Decimal(after.reserved_usd) == 0


async def test_a_model_api_that_keeps_failing_ends_the_session_in_error(harness: Harness) -> None:
    harness.sandbox.add_script(
        "always_500", Script(steps=[Step(fail_always=HttpFailure(500, should_retry=False))])
    )
    before = await budget(harness)

    events = await harness.run(prompt="[[sandbox:always_500]] hello")

    assert kinds(events)[-1] == "result"
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_MODEL_API_ERROR
    assert "500" in final.error.message
    after = await budget(harness)
    assert Decimal(after.reserved_usd) == 0
    assert Decimal(after.spent_usd) - Decimal(before.spent_usd) == Decimal(final.cost_usd)


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "hi", "max_budget_usd": "-1"}, "max_budget_usd"),
        ({"prompt": "hi", "max_budget_usd": "0"}, "max_budget_usd"),
        ({"prompt": "hi", "max_budget_usd": "lots"}, "max_budget_usd"),
        ({"prompt": "hi", "max_budget_usd": "1.5"}, "max_budget_usd"),
        ({"prompt": "hi", "max_turns": -2}, "max_turns"),
        ({"prompt": "hi", "max_turns": 9}, "max_turns"),
        ({"prompt": "hi", "allowed_tools": ["Read", "Bash"]}, "allowed_tools"),
        ({"prompt": "hi", "request_id": "not-a-uuid"}, "request_id"),
        ({"prompt": "hi", "labels": {"Bad Key": "x"}}, "labels['Bad Key']"),
    ],
)
async def test_invalid_requests_name_the_field_and_create_nothing(
    harness: Harness, fields: dict, field_name: str
) -> None:
    before_budget = await budget(harness)
    before = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(page_size=500), metadata=harness.auth()
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run(**fields)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details["BadRequest"].field_violations[0].field == field_name
    assert field_name.split("[")[0] in caught.value.details()
    after = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(page_size=500), metadata=harness.auth()
    )
    assert len(after.sessions) == len(before.sessions)
    assert await budget(harness) == before_budget


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", "acme-secret-token-1"),)],
)
async def test_callers_without_a_known_token_are_unauthenticated(
    harness: Harness, metadata: tuple
) -> None:
    calls = [
        harness.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id="x"), metadata=metadata
        ),
        harness.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=metadata),
        harness.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=metadata),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "wrong" not in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in harness.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="hi"), metadata=metadata
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_answer_longer_than_a_mebibyte_is_streamed_whole(harness: Harness) -> None:
    # The SDK's own limit on one line of the CLI's output is 1 MiB; this answer's line is 1.5.
    long = "".join(f"line {i:06d} of a long answer\n" for i in range(50_000))
    harness.sandbox.add_script(
        "long_answer",
        Script(
            steps=[
                Step(text=long, usage=Usage(input_tokens=100, output_tokens=4000)),
            ]
        ),
    )

    events = await harness.run(prompt="[[sandbox:long_answer]] write a lot")

    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert final.result == long
    assert [e.assistant_text.text for e in events if e.HasField("assistant_text")] == [long]


async def test_another_tenants_session_is_not_found_exactly_like_a_missing_one(
    harness: Harness,
) -> None:
    events = await harness.run(prompt="say hi")
    session_id = events[0].session_id
    missing = "6f1c1f53-5d0c-4a8e-9f57-2c7d3c1f0e11"

    errors = []
    for sid in (session_id, missing):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.sessions.GetSession(
                session_pb2.GetSessionRequest(session_id=sid), metadata=harness.auth("globex")
            )
        errors.append(caught.value)
    assert [e.code() for e in errors] == [grpc.StatusCode.NOT_FOUND] * 2
    assert errors[0].details().replace(session_id, "ID") == errors[1].details().replace(
        missing, "ID"
    )
    listed = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(), metadata=harness.auth("globex")
    )
    assert session_id not in {s.id for s in listed.sessions}


async def test_a_session_the_daily_window_cannot_cover_is_refused(harness: Harness) -> None:
    harness.sandbox.add_script(
        "slow",
        Script(
            steps=[Step(text="done", delay_s=3.0, usage=Usage(input_tokens=10, output_tokens=5))]
        ),
    )
    first = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:slow]] go", max_budget_usd="0.6"),
        metadata=harness.auth("small"),
    )
    started = await first.read()  # admitted: 0.6 of the 1.0 window is now held
    assert started.HasField("started")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run("small", prompt="hi", max_budget_usd="0.6")

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(caught.value)
    assert details["ErrorInfo"].reason == "BUDGET_EXCEEDED"
    assert details["QuotaFailure"].violations[0].subject == "tenant:small:daily_usd"
    assert "0.6" in caught.value.details()
    window = await budget(harness, "small")
    assert Decimal(window.reserved_usd) == Decimal("0.6")

    rest = []
    while (event := await first.read()) is not grpc.aio.EOF:
        rest.append(event)
    assert rest[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    window = await budget(harness, "small")
    assert Decimal(window.reserved_usd) == 0
    assert Decimal(window.spent_usd) == Decimal(rest[-1].result.session.cost_usd)


async def test_list_sessions_pages_newest_first(harness: Harness) -> None:
    for i in range(3):
        await harness.run("globex", prompt=f"number {i}", labels={"batch": "b1", "n": str(i)})

    seen: list[session_pb2.Session] = []
    token = ""
    while True:
        page = await harness.sessions.ListSessions(
            session_pb2.ListSessionsRequest(page_size=2, page_token=token),
            metadata=harness.auth("globex"),
        )
        assert len(page.sessions) <= 2
        seen.extend(page.sessions)
        token = page.next_page_token
        if not token:
            break
    created = [(s.create_time.ToDatetime(), s.id) for s in seen]
    assert created == sorted(created, reverse=True)
    assert len({s.id for s in seen}) == len(seen) >= 3

    labelled = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(labels={"batch": "b1", "n": "1"}),
        metadata=harness.auth("globex"),
    )
    assert [s.labels["n"] for s in labelled.sessions] == ["1"]
    complete = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(state=session_pb2.SESSION_STATE_ERROR),
        metadata=harness.auth("globex"),
    )
    assert all(s.state == session_pb2.SESSION_STATE_ERROR for s in complete.sessions)

    for bad in ("garbage!", token or "eyJjIjoxfQ"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.sessions.ListSessions(
                session_pb2.ListSessionsRequest(page_token=bad), metadata=harness.auth("globex")
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    first = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(page_size=1), metadata=harness.auth("globex")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sessions.ListSessions(
            session_pb2.ListSessionsRequest(
                page_size=1,
                page_token=first.next_page_token,
                state=session_pb2.SESSION_STATE_COMPLETE,
            ),
            metadata=harness.auth("globex"),
        )
    assert "different filters" in caught.value.details()


async def test_get_budget_reports_the_window_and_limits(harness: Harness) -> None:
    b = await budget(harness, "globex")
    assert b.tenant == "globex" and b.time_zone == "UTC"
    assert Decimal(b.limit_usd) == 10
    assert Decimal(b.remaining_usd) == Decimal(b.limit_usd) - Decimal(b.spent_usd) - Decimal(
        b.reserved_usd
    )
    assert (b.window_end.ToDatetime() - b.window_start.ToDatetime()).total_seconds() == 86400
    assert Decimal(b.max_session_budget_usd) == Decimal("0.5") and b.max_turns == 4

    past = await harness.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(date="2020-01-01"), metadata=harness.auth("globex")
    )
    assert past.date == "2020-01-01" and Decimal(past.spent_usd) == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.budgets.GetBudget(
            budget_pb2.GetBudgetRequest(date="yesterday"), metadata=harness.auth("globex")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_caller_that_goes_away_cancels_its_session_and_its_cli(harness: Harness) -> None:
    harness.sandbox.add_script("very_slow", Script(steps=[Step(text="late", delay_s=30.0)]))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:very_slow]] go", model="claude-sonnet-4-5"),
        metadata=harness.auth("globex"),
    )
    started = await call.read()
    await call.read()  # RUNNING
    session_id = started.session_id
    for _ in range(600):  # wait until the CLI has asked the model
        if harness.sandbox.find(script="very_slow"):
            break
        await asyncio.sleep(0.1)
    assert agent_processes(harness.work_dir)  # the check below can see a live CLI
    call.cancel()

    for _ in range(600):
        got = await harness.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=session_id), metadata=harness.auth("globex")
        )
        if got.state == session_pb2.SESSION_STATE_ERROR:
            break
        await asyncio.sleep(0.1)
    assert got.error.reason == session_pb2.ERROR_REASON_CANCELLED
    window = await budget(harness, "globex")
    assert Decimal(window.reserved_usd) == 0
    assert agent_processes(harness.work_dir) == []


async def test_a_model_missing_from_the_price_table_is_invalid(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run(prompt="hi", model="claude-imaginary-9")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details["BadRequest"].field_violations[0].field == "model"
    # The reason the admission-rejection metric counts it under, too.
    assert details["ErrorInfo"].reason == "UNKNOWN_MODEL"
    assert "price table" in caught.value.details()


async def test_a_tenant_without_an_api_key_gets_a_clear_error(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run("nokey", prompt="hi")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "AGENTPLANE_TEST_UNSET_KEY" in caught.value.details()
