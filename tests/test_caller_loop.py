"""Callers in the loop: caller tools, approvals and questions, against the real CLI.

The sandbox model is scripted to call the tools; what the agent saw is read from the
model's next request (its tool results), what the caller saw from the stream.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2
from google.protobuf.duration_pb2 import Duration
from harness import MODEL, Harness, error_details, start_harness, stop_harness

pytestmark = pytest.mark.asyncio

LOOKUP = session_pb2.CallerTool(
    name="lookup",
    description="Look a word up in the caller's dictionary.",
    input_schema_json=json.dumps(
        {
            "type": "object",
            "properties": {"q": {"type": "string"}},
            "required": ["q"],
        }
    ),
)
QUESTION = {
    "questions": [
        {
            "question": "Which database?",
            "header": "DB",
            "multiSelect": False,
            "options": [
                {"label": "pg", "description": "PostgreSQL"},
                {"label": "sqlite", "description": "SQLite"},
            ],
        }
    ]
}


def start(h: Harness, script: str, steps: list[Step], **fields: Any) -> Any:
    h.sandbox.add_script(script, Script(steps=steps))
    fields.setdefault("model", MODEL)
    return h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", **fields),
        metadata=h.auth("loop"),
    )


async def until(call: Any, kind: str, count: int = 1) -> list[session_pb2.SessionEvent]:
    """Events up to the `count`-th of `kind`."""
    events: list[session_pb2.SessionEvent] = []
    while sum(1 for e in events if e.WhichOneof("kind") == kind) < count:
        event = await call.read()
        assert event is not grpc.aio.EOF, f"stream ended before {count} {kind} event(s): {events}"
        events.append(event)
    return events


async def rest(call: Any) -> list[session_pb2.SessionEvent]:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def of(events: list[session_pb2.SessionEvent], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("kind") == kind]


async def respond(
    h: Harness, session_id: str, request_id: str, tenant: str = "loop", **response: Any
) -> session_pb2.RespondResponse:
    return await h.sessions.Respond(
        session_pb2.RespondRequest(session_id=session_id, request_id=request_id, **response),
        metadata=h.auth(tenant),
    )


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def tool_results(h: Harness) -> dict[str, dict[str, Any]]:
    """Every tool result the model was sent, by tool_use_id."""
    found = {}
    for request in h.sandbox.requests:
        for message in request.body.get("messages", []):
            content = message.get("content")
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    found[block["tool_use_id"]] = block
    return found


def text_of(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


async def test_a_caller_tool_is_answered_and_the_agent_sees_the_result(harness: Harness) -> None:
    call = start(
        harness,
        "lookup_once",
        [
            Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "papaya"})]),
            Step(text="done"),
        ],
        tools=[LOOKUP],
    )
    events = await until(call, "input_request")
    session_id = events[0].session_id
    asked = of(events, "input_request")[0]
    use = of(events, "tool_use")[0]
    assert asked.kind == session_pb2.INPUT_KIND_TOOL_CALL
    assert (asked.tool_name, json.loads(asked.input_json)) == ("lookup", {"q": "papaya"})
    assert asked.tool_use_id == use.tool_use_id and use.name == "mcp__caller__lookup"

    waiting = await harness.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=session_id), metadata=harness.auth("loop")
    )
    assert [r.request_id for r in waiting.awaiting] == [asked.request_id]
    assert list(waiting.caller_tools) == ["lookup"]
    listed = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(awaiting=True), metadata=harness.auth("loop")
    )
    assert session_id in [s.id for s in listed.sessions]

    # Wrong kind, unknown request, another tenant: refused, and the request still waits.
    err = await refused(
        respond(
            harness,
            session_id,
            asked.request_id,
            permission=session_pb2.PermissionDecision(allow=True),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await refused(
        respond(
            harness,
            session_id,
            "3f2d6c1e-0b1a-4c3d-9e8f-0123456789ab",
            tool_result=session_pb2.ToolCallResult(text="x"),
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(
        respond(
            harness,
            session_id,
            asked.request_id,
            tenant="ops",
            tool_result=session_pb2.ToolCallResult(text="stolen"),
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND

    answered = await respond(
        harness,
        session_id,
        asked.request_id,
        tool_result=(session_pb2.ToolCallResult(text="PAPAYA-42", structured_json='{"n": 42}')),
    )
    assert answered.resolved.decided_by == session_pb2.DECIDER_CALLER
    assert answered.resolved.outcome == "result"
    tail = await rest(call)
    resolved = of(tail, "input_resolved")
    assert [(r.request_id, r.decided_by) for r in resolved] == [
        (asked.request_id, session_pb2.DECIDER_CALLER)
    ]
    final = tail[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE and not final.awaiting
    seen = text_of(tool_results(harness)[use.tool_use_id])
    assert "PAPAYA-42" in seen and '{"n": 42}' in seen

    err = await refused(
        respond(
            harness,
            session_id,
            asked.request_id,
            tool_result=session_pb2.ToolCallResult(text="again"),
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(err)["ErrorInfo"].reason in ("ALREADY_ANSWERED", "SESSION_ENDED")


async def test_an_unanswered_call_times_out_with_an_error_the_agent_sees(harness: Harness) -> None:
    call = start(
        harness,
        "lookup_unanswered",
        [
            Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "silence"})]),
            Step(text="carried on"),
        ],
        tools=[LOOKUP],
        answer_timeout=Duration(seconds=1),
    )
    events = await until(call, "input_request")
    asked = of(events, "input_request")[0]
    tail = await rest(call)
    resolved = of(tail, "input_resolved")[0]
    assert resolved.decided_by == session_pb2.DECIDER_TIMEOUT and resolved.outcome == "error"
    seen = tool_results(harness)[asked.tool_use_id]
    assert seen.get("is_error") and "did not answer within 1 s" in text_of(seen)
    assert tail[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE

    err = await refused(
        respond(
            harness,
            events[0].session_id,
            asked.request_id,
            tool_result=session_pb2.ToolCallResult(text="late"),
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_denied_bash_call_tells_the_agent_why(harness: Harness) -> None:
    call = start(
        harness,
        "bash_denied",
        [
            Step(tool_calls=[ToolCall("Bash", {"command": "echo deploying > deployed.txt"})]),
            Step(text="ok, I will not"),
        ],
        require_approval=["Bash"],
    )
    events = await until(call, "input_request")
    asked = of(events, "input_request")[0]
    assert asked.kind == session_pb2.INPUT_KIND_PERMISSION and asked.tool_name == "Bash"
    assert json.loads(asked.input_json)["command"] == "echo deploying > deployed.txt"
    await respond(
        harness,
        events[0].session_id,
        asked.request_id,
        permission=session_pb2.PermissionDecision(allow=False, message="not on prod"),
    )
    tail = await rest(call)
    assert of(tail, "input_resolved")[0].outcome == "deny"
    seen = tool_results(harness)[asked.tool_use_id]
    assert seen.get("is_error") and "not on prod" in text_of(seen)
    result = of(tail, "tool_result")[0]
    assert result.is_error and "not on prod" in result.content


async def test_an_approval_with_edited_input_runs_the_edited_call(harness: Harness) -> None:
    call = start(
        harness,
        "bash_edited",
        [
            Step(tool_calls=[ToolCall("Bash", {"command": "echo original"})]),
            Step(text="done"),
        ],
        require_approval=["Bash(echo:*)"],
    )
    events = await until(call, "input_request")
    asked = of(events, "input_request")[0]
    answered = await respond(
        harness,
        events[0].session_id,
        asked.request_id,
        permission=session_pb2.PermissionDecision(
            allow=True, updated_input_json='{"command": "echo edited"}'
        ),
    )
    assert answered.resolved.outcome == "allow_edited"
    tail = await rest(call)
    assert of(tail, "tool_result")[0].content.strip() == "edited"
    assert text_of(tool_results(harness)[asked.tool_use_id]).startswith("edited")


async def test_a_pattern_asks_only_for_the_calls_it_matches(harness: Harness) -> None:
    call = start(
        harness,
        "bash_pattern",
        [
            Step(tool_calls=[ToolCall("Bash", {"command": "echo free"})]),
            Step(tool_calls=[ToolCall("Bash", {"command": "git push origin main"})]),
            Step(text="done"),
        ],
        require_approval=["Bash(git push:*)"],
    )
    events = await until(call, "input_request")
    asked = of(events, "input_request")
    assert [json.loads(a.input_json)["command"] for a in asked] == ["git push origin main"]
    assert of(events, "tool_result")[0].content.strip() == "free"  # ran without asking
    await respond(
        harness,
        events[0].session_id,
        asked[0].request_id,
        permission=session_pb2.PermissionDecision(allow=False),
    )
    tail = await rest(call)
    assert tail[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE


async def test_the_tenants_rule_applies_to_every_request(harness: Harness) -> None:
    # The `loop` tenant requires approval for Write; a request cannot remove it.
    call = start(
        harness,
        "tenant_write",
        [
            Step(tool_calls=[ToolCall("Write", {"file_path": "notes.txt", "content": "x"})]),
            Step(text="done"),
        ],
    )
    events = await until(call, "input_request")
    asked = of(events, "input_request")[0]
    assert asked.tool_name == "Write"
    session = await harness.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=events[0].session_id),
        metadata=harness.auth("loop"),
    )
    assert list(session.require_approval) == ["Write"]
    await respond(
        harness,
        events[0].session_id,
        asked.request_id,
        permission=session_pb2.PermissionDecision(allow=False),
    )
    await rest(call)


async def test_a_question_reaches_the_caller_and_its_answer_the_agent(harness: Harness) -> None:
    call = start(
        harness,
        "question",
        [
            Step(tool_calls=[ToolCall("AskUserQuestion", QUESTION)]),
            Step(text="PostgreSQL it is"),
        ],
    )
    events = await until(call, "input_request")
    asked = of(events, "input_request")[0]
    assert asked.kind == session_pb2.INPUT_KIND_QUESTION
    assert json.loads(asked.input_json)["questions"][0]["question"] == "Which database?"
    await respond(
        harness,
        events[0].session_id,
        asked.request_id,
        answer=session_pb2.QuestionAnswer(answers={"Which database?": "pg"}),
    )
    tail = await rest(call)
    assert of(tail, "input_resolved")[0].outcome == "answered"
    seen = text_of(tool_results(harness)[asked.tool_use_id])
    assert '"Which database?"="pg"' in seen


async def test_two_parallel_calls_answered_out_of_order(harness: Harness) -> None:
    call = start(
        harness,
        "lookup_twice",
        [
            Step(
                tool_calls=[
                    ToolCall("mcp__caller__lookup", {"q": "first"}),
                    ToolCall("mcp__caller__lookup", {"q": "second"}),
                ]
            ),
            Step(text="done"),
        ],
        tools=[LOOKUP],
    )
    events = await until(call, "input_request", count=2)
    asked = {json.loads(a.input_json)["q"]: a for a in of(events, "input_request")}
    session_id = events[0].session_id
    await respond(
        harness,
        session_id,
        asked["second"].request_id,
        tool_result=session_pb2.ToolCallResult(text="answer two"),
    )
    await respond(
        harness,
        session_id,
        asked["first"].request_id,
        tool_result=session_pb2.ToolCallResult(text="answer one"),
    )
    tail = await rest(call)
    assert tail[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    seen = tool_results(harness)
    assert text_of(seen[asked["first"].tool_use_id]).startswith("answer one")
    assert text_of(seen[asked["second"].tool_use_id]).startswith("answer two")


async def test_an_approval_answered_after_a_disconnect_and_reattach(harness: Harness) -> None:
    call = start(
        harness,
        "reattach",
        [
            Step(tool_calls=[ToolCall("Bash", {"command": "echo approved"})]),
            Step(text="done"),
        ],
        require_approval=["Bash"],
        on_disconnect=session_pb2.ON_DISCONNECT_CONTINUE,
    )
    events = await until(call, "input_request")
    session_id = events[0].session_id
    call.cancel()  # the caller goes away while the session waits

    again = harness.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=session_id), metadata=harness.auth("loop")
    )
    replayed = await until(again, "input_request")
    asked = of(replayed, "input_request")[0]
    assert asked == of(events, "input_request")[0]
    await respond(
        harness, session_id, asked.request_id, permission=session_pb2.PermissionDecision(allow=True)
    )
    tail = await rest(again)
    assert of(tail, "tool_result")[0].content.strip() == "approved"
    assert tail[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE


async def test_an_answer_after_cancel_is_refused_and_the_wait_ends_at_once(
    harness: Harness,
) -> None:
    call = start(
        harness,
        "cancel_waiting",
        [
            Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "never"})]),
            Step(text="never"),
        ],
        tools=[LOOKUP],
        answer_timeout=Duration(seconds=600),
    )
    events = await until(call, "input_request")
    session_id = events[0].session_id
    asked = of(events, "input_request")[0]
    cancelled = await harness.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=session_id), metadata=harness.auth("loop")
    )
    assert cancelled.error.reason == session_pb2.ERROR_REASON_CANCELLED
    assert not cancelled.awaiting
    tail = await rest(call)
    assert of(tail, "input_resolved")[0].decided_by == session_pb2.DECIDER_SESSION_END
    err = await refused(
        respond(
            harness,
            session_id,
            asked.request_id,
            tool_result=session_pb2.ToolCallResult(text="too late"),
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(err)["ErrorInfo"].reason == "SESSION_ENDED"


async def test_max_turns_and_the_budget_still_bound_a_session_that_waits(harness: Harness) -> None:
    steps = [Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": f"q{i}"})]) for i in range(5)]
    call = start(harness, "lookup_forever", steps, tools=[LOOKUP], max_turns=2)
    answered = 0
    async for event in call:
        if event.HasField("input_request"):
            answered += 1
            await respond(
                harness,
                event.session_id,
                event.input_request.request_id,
                tool_result=session_pb2.ToolCallResult(text="more"),
            )
        if event.HasField("result"):
            final = event.result.session
    assert final.error.reason == session_pb2.ERROR_REASON_MAX_TURNS and answered == 2

    pricey = [
        Step(
            tool_calls=[ToolCall("mcp__caller__lookup", {"q": "dear"})],
            usage=Usage(input_tokens=100_000, output_tokens=100),
        )
    ] * 3
    call = start(harness, "lookup_pricey", pricey, tools=[LOOKUP], max_budget_usd="0.35")
    async for event in call:
        if event.HasField("input_request"):
            await respond(
                harness,
                event.session_id,
                event.input_request.request_id,
                tool_result=session_pb2.ToolCallResult(text="more"),
            )
        if event.HasField("result"):
            final = event.result.session
    assert final.error.reason == session_pb2.ERROR_REASON_BUDGET_EXCEEDED


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": [session_pb2.CallerTool(name="bad name")]}, "tools[0].name"),
        ({"tools": [LOOKUP, LOOKUP]}, "tools[1].name"),
        ({"tools": [session_pb2.CallerTool(name="Bash")]}, "tools[0].name"),
        (
            {"tools": [session_pb2.CallerTool(name="t", input_schema_json='{"type": "array"}')]},
            "tools[0].input_schema_json",
        ),
        (
            {
                "tools": [
                    session_pb2.CallerTool(
                        name="t",
                        input_schema_json='{"type": "object", "properties": {"q": {"type": 5}}}',
                    )
                ]
            },
            "tools[0].input_schema_json",
        ),
        (
            {"tools": [session_pb2.CallerTool(name="t", input_schema_json="{nope")]},
            "tools[0].input_schema_json",
        ),
        ({"tools": [session_pb2.CallerTool(name=f"t{i}") for i in range(33)]}, "tools"),
        ({"require_approval": ["Bash(unclosed"]}, "require_approval[0]"),
        ({"require_approval": ["Edit"]}, "require_approval[0]"),
        ({"answer_timeout": Duration(seconds=601)}, "answer_timeout"),
        ({"answer_timeout": Duration(seconds=-1)}, "answer_timeout"),
    ],
)
async def test_a_malformed_loop_is_invalid_argument_naming_the_field(
    harness: Harness, fields: dict[str, Any], field: str
) -> None:
    err = await refused(
        harness.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="hi", model=MODEL, **fields),
            metadata=harness.auth("loop"),
        ).read()
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    violations = error_details(err)["BadRequest"].field_violations
    assert [v.field for v in violations] == [field]


async def test_respond_needs_its_ids_and_a_response(harness: Harness) -> None:
    for request, field in (
        (session_pb2.RespondRequest(request_id="x"), "session_id"),
        (
            session_pb2.RespondRequest(
                session_id="3f2d6c1e-0b1a-4c3d-9e8f-0123456789ab", request_id="x"
            ),
            "response",
        ),
    ):
        err = await refused(harness.sessions.Respond(request, metadata=harness.auth("loop")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error_details(err)["BadRequest"].field_violations] == [field]
    err = await refused(
        harness.sessions.Respond(
            session_pb2.RespondRequest(
                session_id="3f2d6c1e-0b1a-4c3d-9e8f-0123456789ab",
                request_id="x",
                tool_result=session_pb2.ToolCallResult(text="x"),
            ),
            metadata=harness.auth("loop"),
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_a_caller_tool_answered_through_another_replica(replicas: Any) -> None:
    owner, other = replicas
    call = start(
        owner,
        "lookup_elsewhere",
        [
            Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "far"})]),
            Step(text="done"),
        ],
        tools=[LOOKUP],
    )
    events = await until(call, "input_request")
    session_id = events[0].session_id
    asked = of(events, "input_request")[0]

    seen = await other.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=session_id), metadata=other.auth("loop")
    )
    assert [r.request_id for r in seen.awaiting] == [asked.request_id]
    assert seen.awaiting[0] == asked
    listed = await other.sessions.ListSessions(
        session_pb2.ListSessionsRequest(awaiting=True), metadata=other.auth("loop")
    )
    assert session_id in [s.id for s in listed.sessions]
    err = await refused(
        respond(
            other,
            session_id,
            asked.request_id,
            tenant="ops",
            tool_result=session_pb2.ToolCallResult(text="stolen"),
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND

    await respond(
        other,
        session_id,
        asked.request_id,
        tool_result=session_pb2.ToolCallResult(text="from afar"),
    )
    tail = await rest(call)
    assert tail[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert text_of(tool_results(owner)[asked.tool_use_id]).startswith("from afar")
    listed = await other.sessions.ListSessions(
        session_pb2.ListSessionsRequest(awaiting=True), metadata=other.auth("loop")
    )
    assert session_id not in [s.id for s in listed.sessions]


# The agent's own silences (the CLI starting up, answering) must stay far below the idle
# timeout even on a loaded machine, where they take seconds; the caller's, above it.
IDLE_TIMEOUT_S = 8.0


async def test_the_idle_timeout_does_not_fire_while_the_caller_is_asked(database_url: str) -> None:
    h = await start_harness(database_url, session_idle_timeout_s=IDLE_TIMEOUT_S)
    try:
        call = start(
            h,
            "slow_caller",
            [
                Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "slow"})]),
                Step(text="done"),
            ],
            tools=[LOOKUP],
        )
        events = await until(call, "input_request")
        await asyncio.sleep(IDLE_TIMEOUT_S + 1)  # the caller takes longer than the idle timeout
        await respond(
            h,
            events[0].session_id,
            of(events, "input_request")[0].request_id,
            tool_result=session_pb2.ToolCallResult(text="finally"),
        )
        final = (await rest(call))[-1].result.session
        assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    finally:
        await stop_harness(h)


async def test_a_caller_tool_that_needs_approval_asks_first_then_calls(harness: Harness) -> None:
    call = start(
        harness,
        "lookup_approved",
        [
            Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "guarded"})]),
            Step(text="done"),
        ],
        tools=[LOOKUP],
        require_approval=["lookup"],
    )
    events = await until(call, "input_request")
    session_id = events[0].session_id
    permission = of(events, "input_request")[0]
    assert (permission.kind, permission.tool_name) == (session_pb2.INPUT_KIND_PERMISSION, "lookup")
    await respond(
        harness,
        session_id,
        permission.request_id,
        permission=session_pb2.PermissionDecision(allow=True),
    )
    events = await until(call, "input_request")
    tool_call = of(events, "input_request")[0]
    assert tool_call.kind == session_pb2.INPUT_KIND_TOOL_CALL
    assert tool_call.tool_use_id == permission.tool_use_id
    await respond(
        harness,
        session_id,
        tool_call.request_id,
        tool_result=session_pb2.ToolCallResult(text="guarded answer"),
    )
    tail = await rest(call)
    assert tail[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert text_of(tool_results(harness)[tool_call.tool_use_id]).startswith("guarded answer")
