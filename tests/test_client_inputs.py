"""Callers in the loop from the Python clients (issue 15): caller tools, approvals and the
agent's questions answered by handlers or by hand, against the real server; and the
conversions behind them."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import grpc
import pytest
from agentplane import (
    Allow,
    AsyncClient,
    Client,
    Deny,
    PermissionRequest,
    QuestionOption,
    QuestionRequest,
    RPCError,
    Tool,
    ToolCall,
    ToolResult,
)
from agentplane import _inputs as inputs
from agentplane import _requests as rq
from agentplane.server.model_double.script import Script, Step, Usage
from agentplane.server.model_double.script import ToolCall as ScriptedCall
from agentplane.v1 import session_pb2
from harness import MODEL, TOKENS, Harness
from model_view import (
    ASK_ID,
    BASH_COMMAND,
    BASH_ID,
    BASH_OUTPUT,
    LOOKUP_ID,
    QUESTION,
    question_input,
    tool_results_seen,
    tools_offered,
)

LOOKUP = Tool(
    "lookup",
    "Looks a word up in the caller's dictionary.",
    {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
)


def target(h: Harness) -> str:
    return f"127.0.0.1:{h.app.port}"


def three_asks(name: str, *, multi_select: bool = False) -> Script:
    """A caller tool's call, then Bash (which the tests make need approval), then a
    question, then the answer."""
    return Script(
        steps=[
            Step(
                tool_calls=[ScriptedCall("mcp__caller__lookup", {"word": "papaya"}, LOOKUP_ID)],
                usage=Usage(1000, 30),
            ),
            Step(
                tool_calls=[ScriptedCall("Bash", {"command": BASH_COMMAND}, BASH_ID)],
                usage=Usage(1100, 30),
            ),
            Step(
                tool_calls=[ScriptedCall("AskUserQuestion", question_input(multi_select), ASK_ID)],
                usage=Usage(1200, 30),
            ),
            Step(text=f"{name} done", usage=Usage(1300, 10)),
        ]
    )


def of_kind(events: list[session_pb2.SessionEvent], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.HasField(kind)]


def assert_asked_three_times(events: list[session_pb2.SessionEvent]) -> None:
    asked = of_kind(events, "input_request")
    assert [(r.kind, r.tool_name) for r in asked] == [
        (session_pb2.INPUT_KIND_TOOL_CALL, "lookup"),
        (session_pb2.INPUT_KIND_PERMISSION, "Bash"),
        (session_pb2.INPUT_KIND_QUESTION, "AskUserQuestion"),
    ]
    resolved = of_kind(events, "input_resolved")
    assert [r.request_id for r in resolved] == [r.request_id for r in asked]
    assert {r.decided_by for r in resolved} == {session_pb2.DECIDER_CALLER}
    # Each request is settled before the session goes on.
    seqs = {e.input_request.request_id: e.seq for e in events if e.HasField("input_request")}
    for e in events:
        if e.HasField("input_resolved"):
            assert e.seq > seqs[e.input_resolved.request_id]


async def test_the_sync_client_answers_a_tool_call_an_approval_and_a_question(
    harness: Harness,
) -> None:
    harness.sandbox.add_script("inputs_sync", three_asks("sync"))
    seen: list[Any] = []

    def on_tool_call(call: ToolCall) -> str:
        seen.append(call)
        return f"{call.input['word']}: a tropical fruit (caller's dictionary)"

    def on_permission(request: PermissionRequest) -> bool:
        seen.append(request)
        return True

    def on_question(request: QuestionRequest) -> dict[str, str]:
        seen.append(request)
        return {request.questions[0].question: request.questions[0].options[1].label}

    def work() -> tuple[list[session_pb2.SessionEvent], session_pb2.Session]:
        with Client(target(harness), token=TOKENS["loop"], timeout=10) as client:
            events = list(
                client.run(
                    "[[sandbox:inputs_sync]] report",
                    model=MODEL,
                    tools=[LOOKUP],
                    require_approval=["Bash"],
                    answer_timeout=60,
                    on_tool_call=on_tool_call,
                    on_permission=on_permission,
                    on_question=on_question,
                )
            )
            return events, client.get_session(events[0].session_id)

    events, session = await asyncio.to_thread(work)

    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE and final.result == "sync done"
    assert_asked_three_times(events)
    assert [r.outcome for r in of_kind(events, "input_resolved")] == ["result", "allow", "answered"]
    call, permission, question = seen
    assert isinstance(call, ToolCall) and call.tool_name == "lookup"
    assert call.input == {"word": "papaya"} and call.tool_use_id == LOOKUP_ID
    assert call.session_id == final.id and call.deadline is not None
    assert call.deadline > dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    assert isinstance(permission, PermissionRequest) and permission.tool_name == "Bash"
    assert permission.input["command"] == BASH_COMMAND
    assert isinstance(question, QuestionRequest) and question.tool_name == "AskUserQuestion"
    (asked,) = question.questions
    assert (asked.question, asked.header, asked.multi_select) == (QUESTION, "Fruit", False)
    assert asked.options == (
        QuestionOption("Papaya", "the magic word"),
        QuestionOption("Mango", "another fruit"),
    )

    # What the model was sent: each answer reached the agent.
    results = tool_results_seen(harness.sandbox, "inputs_sync")
    assert "a tropical fruit (caller's dictionary)" in results[LOOKUP_ID][0]
    assert not results[LOOKUP_ID][1]
    assert BASH_OUTPUT in results[BASH_ID][0] and not results[BASH_ID][1]  # Bash ran
    assert "Mango" in results[ASK_ID][0]
    assert "mcp__caller__lookup" in tools_offered(harness.sandbox, "inputs_sync")

    assert list(session.caller_tools) == ["lookup"] and "Bash" in session.require_approval
    assert list(session.awaiting) == []


async def test_the_async_client_answers_with_async_handlers_errors_and_denials(
    harness: Harness,
) -> None:
    harness.sandbox.add_script("inputs_async", three_asks("async", multi_select=True))
    asked: list[str] = []

    async def on_tool_call(call: ToolCall) -> str:
        asked.append(call.tool_name)
        await asyncio.sleep(0)
        raise LookupError(f"no entry for {call.input['word']!r} in the dictionary")

    def on_permission(request: PermissionRequest) -> Deny:  # a plain function is fine too
        asked.append(request.tool_name)
        return Deny("not on a Friday")

    async def on_question(request: QuestionRequest) -> dict[str, list[str]]:
        asked.append(request.tool_name)
        return {request.questions[0].question: ["Papaya", "Mango"]}

    async with AsyncClient(target(harness), token=TOKENS["loop"], timeout=10) as client:
        events = [
            e
            async for e in client.run(
                "[[sandbox:inputs_async]] report",
                model=MODEL,
                tools=[
                    {
                        "name": "lookup",
                        "description": "Looks a word up.",
                        "input_schema": {
                            "type": "object",
                            "properties": {"word": {"type": "string"}},
                        },
                    },
                ],
                require_approval=["Bash"],
                answer_timeout=dt.timedelta(minutes=1),
                on_tool_call=on_tool_call,
                on_permission=on_permission,
                on_question=on_question,
            )
        ]

    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE and final.result == "async done"
    assert asked == ["lookup", "Bash", "AskUserQuestion"]
    assert_asked_three_times(events)
    resolved = of_kind(events, "input_resolved")
    assert [r.outcome for r in resolved] == ["error", "deny", "answered"]
    assert "not on a Friday" in resolved[1].message
    results = tool_results_seen(harness.sandbox, "inputs_async")
    text, is_error = results[LOOKUP_ID]
    assert is_error and "no entry for 'papaya' in the dictionary" in text
    text, is_error = results[BASH_ID]
    assert "not on a Friday" in text and BASH_OUTPUT not in text  # Bash did not run
    assert "Papaya, Mango" in results[ASK_ID][0]


async def test_a_request_without_a_handler_is_answered_by_hand(harness: Harness) -> None:
    harness.sandbox.add_script(
        "inputs_manual",
        Script(
            steps=[
                Step(
                    tool_calls=[ScriptedCall("mcp__caller__lookup", {"word": "mango"}, LOOKUP_ID)]
                ),
                Step(text="manual done"),
            ]
        ),
    )

    async with AsyncClient(target(harness), token=TOKENS["loop"], timeout=10) as client:
        # Handlers for the other kinds only: the tool call is left to us.
        stream = client.run(
            "[[sandbox:inputs_manual]] look it up",
            model=MODEL,
            tools=[LOOKUP],
            on_permission=lambda r: False,
        )
        events = []
        async for event in stream:
            events.append(event)
            if not event.HasField("input_request"):
                continue
            request = event.input_request
            waiting = await client.get_session(event.session_id)
            listed = await client.list_sessions(awaiting=True)
            with pytest.raises(RPCError) as wrong_kind:
                await client.respond(event.session_id, request.request_id, permission=True)
            resolved = await client.respond(
                event.session_id,
                request.request_id,
                tool_result=ToolResult("mango: a stone fruit", structured={"sweet": True}),
            )
            with pytest.raises(RPCError) as again:
                await client.respond(event.session_id, request.request_id, tool_result="again")

    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE and final.result == "manual done"
    assert [r.request_id for r in waiting.awaiting] == [request.request_id]
    assert event.session_id in [s.id for s in listed.sessions]
    assert wrong_kind.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert resolved.outcome == "result" and resolved.decided_by == session_pb2.DECIDER_CALLER
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert again.value.reason == "ALREADY_ANSWERED"
    text, is_error = tool_results_seen(harness.sandbox, "inputs_manual")[LOOKUP_ID]
    assert "mango: a stone fruit" in text and "sweet" in text and "true" in text
    assert not is_error


async def test_a_tool_declared_without_a_schema_takes_any_object(harness: Harness) -> None:
    harness.sandbox.add_script(
        "inputs_any",
        Script(
            steps=[
                Step(tool_calls=[ScriptedCall("mcp__caller__now", {"zone": "UTC"}, LOOKUP_ID)]),
                Step(text="any done"),
            ]
        ),
    )
    calls: list[ToolCall] = []

    def on_tool_call(call: ToolCall) -> str:
        calls.append(call)
        return "12:00"

    async with AsyncClient(target(harness), token=TOKENS["loop"], timeout=10) as client:
        events = [
            e
            async for e in client.run(
                "[[sandbox:inputs_any]] what time is it",
                model=MODEL,
                tools=[Tool("now", "The time now.")],
                on_tool_call=on_tool_call,
            )
        ]

    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert [c.input for c in calls] == [{"zone": "UTC"}]
    assert "12:00" in tool_results_seen(harness.sandbox, "inputs_any")[LOOKUP_ID][0]


async def test_a_handlers_late_answer_to_a_request_settled_elsewhere_is_dropped(
    harness: Harness,
) -> None:
    harness.sandbox.add_script(
        "inputs_late",
        Script(
            steps=[
                Step(tool_calls=[ScriptedCall("Bash", {"command": BASH_COMMAND}, BASH_ID)]),
                Step(text="late done"),
            ]
        ),
    )

    def work() -> list[session_pb2.SessionEvent]:
        with (
            Client(target(harness), token=TOKENS["loop"], timeout=10) as client,
            Client(target(harness), token=TOKENS["loop"], timeout=10) as elsewhere,
        ):

            def on_permission(request: PermissionRequest) -> bool:
                # Someone else (another process, another replica) answers first.
                elsewhere.respond(
                    request.session_id,
                    request.request_id,
                    permission=Allow({"command": "echo edited-$((2*3))"}),
                )
                return False

            return list(
                client.run(
                    "[[sandbox:inputs_late]] run it",
                    model=MODEL,
                    require_approval=["Bash"],
                    on_permission=on_permission,
                )
            )

    events = await asyncio.to_thread(work)

    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    (resolved,) = of_kind(events, "input_resolved")
    assert resolved.outcome == "allow_edited"  # the first answer, not the handler's "deny"
    text, is_error = tool_results_seen(harness.sandbox, "inputs_late")[BASH_ID]
    assert "edited-6" in text and not is_error


async def test_a_permission_handlers_exception_stops_the_iteration(harness: Harness) -> None:
    harness.sandbox.add_script(
        "inputs_raise",
        Script(
            steps=[
                Step(tool_calls=[ScriptedCall("Bash", {"command": BASH_COMMAND}, BASH_ID)]),
                Step(text="never"),
            ]
        ),
    )

    def on_permission(request: PermissionRequest) -> bool:
        raise RuntimeError("the approval service is down")

    async with AsyncClient(target(harness), token=TOKENS["loop"], timeout=10) as client:
        stream = client.run(
            "[[sandbox:inputs_raise]] run it",
            model=MODEL,
            require_approval=["Bash"],
            on_permission=on_permission,
        )
        events = []
        with pytest.raises(RuntimeError, match="the approval service is down"):
            async with stream:
                async for event in stream:
                    events.append(event)
        assert events[-1].HasField("input_request")
        session_id = events[0].session_id
        for _ in range(1200):  # leaving the stream was a disconnect: the session is cancelled
            session = await client.get_session(session_id)
            if session.state == session_pb2.SESSION_STATE_ERROR:
                break
            await asyncio.sleep(0.05)
    assert session.error.reason == session_pb2.ERROR_REASON_CANCELLED


# -- the conversions, without a server --------------------------------------------------------


def test_tools_are_declared_from_tools_dicts_or_protos() -> None:
    request = rq.run_request(
        "hi",
        tools=[LOOKUP, {"name": "now"}, session_pb2.CallerTool(name="raw")],
        require_approval=["Bash(git push:*)", "lookup"],
        answer_timeout=2.5,
    )
    assert [t.name for t in request.tools] == ["lookup", "now", "raw"]
    assert json.loads(request.tools[0].input_schema_json)["required"] == ["word"]
    assert request.tools[0].description.startswith("Looks")
    assert request.tools[1].input_schema_json == ""
    assert list(request.require_approval) == ["Bash(git push:*)", "lookup"]
    assert request.answer_timeout.ToTimedelta() == dt.timedelta(seconds=2.5)
    assert not rq.run_request("hi").HasField("answer_timeout")

    with pytest.raises(TypeError, match="unknown tool field"):
        rq.run_request("hi", tools=[{"name": "x", "schema": {}}])
    with pytest.raises(TypeError, match="needs a name"):
        rq.run_request("hi", tools=[{"description": "x"}])
    with pytest.raises(TypeError, match="list of tools"):
        rq.run_request("hi", tools=LOOKUP)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a string"):
        rq.run_request("hi", require_approval="Bash")
    with pytest.raises(ValueError, match="negative"):
        rq.run_request("hi", answer_timeout=-1)


def test_answers_become_respond_requests() -> None:
    def respond(**kwargs: Any) -> session_pb2.RespondRequest:
        return inputs.respond_request("s", "r", **kwargs)

    assert respond(tool_result_="text").tool_result == session_pb2.ToolCallResult(text="text")
    structured = respond(tool_result_={"n": 1}).tool_result
    assert structured.text == "" and json.loads(structured.structured_json) == {"n": 1}
    both = respond(tool_result_=ToolResult("t", {"a": [1]}, is_error=True)).tool_result
    assert (both.text, json.loads(both.structured_json), both.is_error) == ("t", {"a": [1]}, True)
    assert respond(permission=True).permission == session_pb2.PermissionDecision(allow=True)
    assert respond(permission=False).permission == session_pb2.PermissionDecision()
    edited = respond(permission=Allow({"command": "ls"})).permission
    assert edited.allow and json.loads(edited.updated_input_json) == {"command": "ls"}
    assert respond(permission=Deny("no")).permission.message == "no"
    assert dict(respond(answers_={"Q": "A", "M": ["x", "y"]}).answer.answers) == {
        "Q": "A",
        "M": "x, y",
    }
    assert respond(answers_={}).WhichOneof("response") == "answer"

    for bad in ({}, {"tool_result_": "a", "permission": True}):
        with pytest.raises(TypeError, match="exactly one"):
            respond(**bad)
    with pytest.raises(TypeError):
        respond(permission="yes")
    with pytest.raises(TypeError):
        respond(tool_result_=42)
    with pytest.raises(TypeError):
        respond(answers_={"Q": 1})


async def test_handlers_results_exceptions_and_none() -> None:
    def request(kind: int, input_json: str = "{}") -> inputs.AnyRequest:
        parsed = inputs.parse_request(
            "s",
            session_pb2.InputRequest(
                request_id="r", kind=kind, tool_name="t", input_json=input_json
            ),
        )
        assert parsed is not None
        return parsed

    call = request(session_pb2.INPUT_KIND_TOOL_CALL, '{"word": "x"}')
    assert isinstance(call, ToolCall) and call.input == {"word": "x"} and call.deadline is None

    def fails(_: Any) -> str:
        raise KeyError("missing")

    sent = inputs.handle(call, fails)
    assert sent is not None and sent.tool_result.is_error and "missing" in sent.tool_result.text
    assert inputs.handle(call, lambda _: None) is None  # left unanswered

    permission = request(session_pb2.INPUT_KIND_PERMISSION)
    with pytest.raises(KeyError):
        inputs.handle(permission, fails)

    async def coroutine(_: Any) -> bool:
        return True

    with pytest.raises(TypeError, match="AsyncClient"):
        inputs.handle(permission, coroutine)
    sent = await inputs.handle_async(permission, coroutine)
    assert sent is not None and sent.permission.allow

    question = request(session_pb2.INPUT_KIND_QUESTION, json.dumps(question_input(True)))
    assert isinstance(question, QuestionRequest)
    assert question.questions[0].multi_select and question.questions[0].header == "Fruit"
    assert inputs.parse_request("s", session_pb2.InputRequest(kind=0)) is None
    odd = request(session_pb2.INPUT_KIND_QUESTION, '{"questions": [1, {"question": "q"}]}')
    assert isinstance(odd, QuestionRequest) and [q.question for q in odd.questions] == ["q"]
