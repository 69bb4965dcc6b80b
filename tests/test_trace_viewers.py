"""What a GenAI trace viewer (Phoenix, ...) reads from a session's trace, received over
real OTLP, with content recording on (AGENTPLANE_TRACE_CONTENT=1): token counts and cost
as the GenAI conventions define them and as the database records them; a root span that
names its session, tenant, input, output and outcome; messages that validate against the
conventions' message schemas; calls about a session linked to its trace; and the
gateway's JSON log line per model request, with its chat span's ids.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import grpc
import jsonschema
import pytest
from agentplane.server.gateway.sse import ResponseFacts, SseUsageParser, usage_from_message
from agentplane.server.model_double import HttpFailure, Script, Step, ToolCall, Usage
from agentplane.server.model_double.sse import Reply, encode_event
from agentplane.server.store.models import ModelRequestRow
from agentplane.server.telemetry import messages
from agentplane.server.telemetry.setup import ContentPolicy
from agentplane.v1 import session_pb2
from harness import MODEL, error_details
from opentelemetry.proto.trace.v1 import trace_pb2
from otlp_receiver import attributes
from sqlalchemy import select
from traced import Traced, hexid, json_logs, start_traced

RUN_SESSION = "/agentplane.v1.SessionService/RunSession"
ERROR = trace_pb2.Status.STATUS_CODE_ERROR
UNSET = trace_pb2.Status.STATUS_CODE_UNSET

# The GenAI conventions' message schemas (gen-ai-input-messages.json and
# gen-ai-output-messages.json), reduced to what they require of a message and of each
# part type agentplane writes.
_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string"}},
    "allOf": [
        {
            "if": {"properties": {"type": {"enum": ["text", "reasoning"]}}},
            "then": {"required": ["content"], "properties": {"content": {"type": "string"}}},
        },
        {
            "if": {"properties": {"type": {"const": "tool_call"}}},
            "then": {"required": ["name"], "properties": {"name": {"type": "string"}}},
        },
        {
            "if": {"properties": {"type": {"const": "tool_call_response"}}},
            "then": {"required": ["response"]},
        },
    ],
}
_ROLE = {"type": "string", "minLength": 1}
INPUT_MESSAGES = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["role", "parts"],
        "properties": {"role": _ROLE, "parts": {"type": "array", "items": _PART}},
    },
}
OUTPUT_MESSAGES = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["role", "parts", "finish_reason"],
        "properties": {
            "role": _ROLE,
            "parts": {"type": "array", "items": _PART},
            "finish_reason": {"type": "string", "minLength": 1},
        },
    },
}
SYSTEM_INSTRUCTIONS = {"type": "array", "items": _PART}


@pytest.fixture(scope="module")
def logs(database_url: str) -> Iterator[io.StringIO]:
    with json_logs() as buffer:
        yield buffer


@pytest.fixture(scope="module")
async def viewer(database_url: str, logs: io.StringIO) -> AsyncIterator[Traced]:
    t = await start_traced(database_url, logs, content=ContentPolicy(capture=True))
    yield t
    await t.close()


def attrs(span: trace_pb2.Span) -> dict[str, Any]:
    return attributes(span.attributes)


async def trace_of(viewer: Traced, session_id: str, chats: int = 0) -> list[trace_pb2.Span]:
    """The spans of the trace a session was admitted in, once its invoke_agent span (and
    `chats` chat spans) arrived."""

    def agent(spans: list[trace_pb2.Span]) -> trace_pb2.Span | None:
        return next(
            (
                s
                for s in spans
                if s.name.startswith("invoke_agent") and attrs(s).get("session.id") == session_id
            ),
            None,
        )

    def ready(spans: list[trace_pb2.Span]) -> bool:
        found = agent(spans)
        if found is None:
            return False
        ours = [s for s in spans if s.trace_id == found.trace_id]
        return sum(s.name.startswith("chat ") for s in ours) >= chats and any(
            s.name == RUN_SESSION for s in ours
        )

    spans = await viewer.spans(ready)
    found = agent(spans)
    assert found is not None, f"no invoke_agent span for {session_id}"
    return [s for s in spans if s.trace_id == found.trace_id]


def one(spans: list[trace_pb2.Span], name: str) -> trace_pb2.Span:
    (span,) = [s for s in spans if s.name == name]
    return span


async def db_requests(viewer: Traced, session_id: str) -> list[ModelRequestRow]:
    async with viewer.h.app.engine.connect() as db:
        rows = await db.execute(
            select(ModelRequestRow)
            .where(ModelRequestRow.session_id == session_id)
            .order_by(ModelRequestRow.id)
        )
        return list(rows.all())  # type: ignore[arg-type]


async def test_cached_tokens_count_as_input_and_the_cost_is_the_databases(
    viewer: Traced,
) -> None:
    h = viewer.h
    first = Usage(
        input_tokens=120,
        output_tokens=40,
        cache_creation_input_tokens=3000,
        cache_read_input_tokens=0,
    )
    second = Usage(
        input_tokens=80,
        output_tokens=25,
        cache_creation_input_tokens=200,
        cache_read_input_tokens=3000,
    )
    h.sandbox.add_script(
        "cached",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("Glob", {"pattern": "*.txt"})], usage=first),
                Step(text="cached answer", usage=second),
            ]
        ),
    )
    # No model asked for: the CLI picks one, which the session records.
    events = await h.run(prompt="[[sandbox:cached]] go", model="")
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    spans = await trace_of(viewer, final.id, chats=2)
    agent = attrs(one(spans, "invoke_agent acme"))
    chats = sorted(
        (s for s in spans if s.name.startswith("chat ")), key=lambda s: s.start_time_unix_nano
    )
    rows = await db_requests(viewer, final.id)
    assert len(chats) == len(rows) == 2

    for chat, row, usage in zip(chats, rows, (first, second), strict=True):
        a = attrs(chat)
        assert row.input_tokens == usage.input_tokens  # the database keeps Anthropic's counts
        assert a["gen_ai.usage.input_tokens"] == (
            row.input_tokens + row.cache_read_input_tokens + row.cache_creation_input_tokens
        )
        assert a["gen_ai.usage.cache_read.input_tokens"] == row.cache_read_input_tokens
        assert a["gen_ai.usage.cache_creation.input_tokens"] == row.cache_creation_input_tokens
        assert a["gen_ai.usage.output_tokens"] == row.output_tokens
        assert Decimal(a["agentplane.cost_usd"]) == row.cost_usd > 0
        assert a["gen_ai.request.model"] == row.model == final.model

    u = final.usage
    assert agent["gen_ai.usage.input_tokens"] == 120 + 3000 + 80 + 200 + 3000
    assert agent["gen_ai.usage.input_tokens"] == (
        u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    )
    assert agent["gen_ai.usage.cache_read.input_tokens"] == u.cache_read_input_tokens == 3000
    assert agent["gen_ai.usage.cache_creation.input_tokens"] == u.cache_creation_input_tokens
    assert agent["gen_ai.usage.output_tokens"] == u.output_tokens == 65
    assert agent["agentplane.cost_usd"] == pytest.approx(float(sum(r.cost_usd for r in rows)))
    assert Decimal(final.cost_usd) == sum(r.cost_usd for r in rows)
    # The model that ran, though the caller asked for none.
    assert "gen_ai.request.model" not in agent
    assert agent["gen_ai.response.model"] == final.model == rows[0].model


async def test_chat_spans_carry_status_response_and_messages_that_validate(
    viewer: Traced,
) -> None:
    h = viewer.h
    h.sandbox.add_script(
        "messages",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("Read", {"file_path": "/nonexistent/a.txt"})]),
                Step(text="the file is missing"),
            ]
        ),
    )
    events = await h.run(prompt="[[sandbox:messages]] read a.txt")
    final = events[-1].result.session
    spans = await trace_of(viewer, final.id, chats=2)
    chats = sorted(
        (s for s in spans if s.name.startswith("chat ")), key=lambda s: s.start_time_unix_nano
    )
    reasons = []
    for chat in chats:
        a = attrs(chat)
        assert a["http.response.status_code"] == 200
        assert a["gen_ai.response.id"].startswith("msg_")
        assert a["gen_ai.response.model"] == MODEL
        assert a["agentplane.model_request.outcome"] == "completed"
        reasons.append(a["gen_ai.response.finish_reasons"])
        sent = json.loads(a["gen_ai.input.messages"])
        jsonschema.validate(sent, INPUT_MESSAGES)
        jsonschema.validate(json.loads(a["gen_ai.system_instructions"]), SYSTEM_INSTRUCTIONS)
        output = json.loads(a["gen_ai.output.messages"])
        jsonschema.validate(output, OUTPUT_MESSAGES)
        assert output[0]["role"] == "assistant"
        assert [output[0]["finish_reason"]] == a["gen_ai.response.finish_reasons"]
    assert reasons == [["tool_call"], ["stop"]]

    first_out = json.loads(attrs(chats[0])["gen_ai.output.messages"])[0]["parts"]
    (call,) = [p for p in first_out if p["type"] == "tool_call"]
    assert call["name"] == "Read" and call["arguments"] == {"file_path": "/nonexistent/a.txt"}
    second_in = json.loads(attrs(chats[1])["gen_ai.input.messages"])
    (answer,) = [p for m in second_in for p in m["parts"] if p["type"] == "tool_call_response"]
    assert answer["id"] == call["id"]
    second_out = json.loads(attrs(chats[1])["gen_ai.output.messages"])[0]["parts"]
    assert second_out == [{"type": "text", "content": "the file is missing"}]

    agent = attrs(one(spans, "invoke_agent acme"))
    jsonschema.validate(json.loads(agent["gen_ai.input.messages"]), INPUT_MESSAGES)
    output = json.loads(agent["gen_ai.output.messages"])
    jsonschema.validate(output, OUTPUT_MESSAGES)
    assert output[0]["parts"][0]["content"] == final.result == "the file is missing"
    assert agent["input.value"] == "[[sandbox:messages]] read a.txt"
    assert agent["output.value"] == final.result


async def test_the_root_span_of_a_completed_session_reads_at_a_glance(viewer: Traced) -> None:
    h = viewer.h
    h.sandbox.add_script("glance", Script(steps=[Step(text="all done")]))
    events = await h.run(
        prompt="[[sandbox:glance]] summarise", labels={"team": "search", "ticket": "T-7"}
    )
    final = events[-1].result.session
    spans = await trace_of(viewer, final.id)
    root = one(spans, RUN_SESSION)
    a = attrs(root)
    assert root.parent_span_id == b""  # no caller trace: the root of its own
    assert a["openinference.span.kind"] == "CHAIN"
    assert a["session.id"] == final.id
    assert a["user.id"] == a["agentplane.tenant"] == "acme"
    assert json.loads(a["metadata"]) == {"team": "search", "ticket": "T-7"}
    assert (a["agentplane.label.team"], a["agentplane.label.ticket"]) == ("search", "T-7")
    assert a["input.value"] == "[[sandbox:glance]] summarise"
    assert a["output.value"] == "all done"
    assert a["agentplane.session.state"] == "COMPLETE"
    assert a["gen_ai.conversation.id"] == final.sdk_session_id
    assert root.status.code == UNSET and "error.type" not in a
    assert list(root.events) == []
    assert final.trace_id == hexid(root.trace_id)  # GetSession's too, below
    agent = attrs(one(spans, "invoke_agent acme"))
    assert agent["user.id"] == "acme" and agent["agentplane.label.team"] == "search"
    assert json.loads(agent["metadata"]) == {"team": "search", "ticket": "T-7"}


async def test_the_root_span_of_a_failed_session_has_its_reason(viewer: Traced) -> None:
    h = viewer.h
    h.sandbox.add_script(
        "upstream400", Script(steps=[Step(fail_always=HttpFailure(400, should_retry=False))])
    )
    events = await h.run(prompt="[[sandbox:upstream400]] go")  # not retried: a 4xx
    final = events[-1].result.session
    assert final.error.reason == session_pb2.ERROR_REASON_MODEL_API_ERROR
    spans = await trace_of(viewer, final.id, chats=1)
    root = one(spans, RUN_SESSION)
    a = attrs(root)
    assert root.status.code == ERROR and a["error.type"] == "MODEL_API_ERROR"
    assert root.status.message.startswith("MODEL_API_ERROR: ")
    assert a["session.id"] == final.id and a["user.id"] == "acme"
    assert a["rpc.grpc.status_code"] == 0  # the call itself went well
    assert "output.value" not in a and list(root.events) == []
    for chat in (s for s in spans if s.name.startswith("chat ")):  # a 400, not just "failed"
        c = attrs(chat)
        assert c["http.response.status_code"] == 400 and c["error.type"] == "upstream_error"
        assert chat.status.code == ERROR


async def test_a_refused_session_is_an_error_with_its_reason_not_a_stack_trace(
    viewer: Traced,
) -> None:
    h = viewer.h
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await h.run(prompt="refuse me", model="claude-nonexistent-9")
    assert error_details(refused.value)["ErrorInfo"].reason == "UNKNOWN_MODEL"

    def arrived(spans: list[trace_pb2.Span]) -> bool:
        return any(
            s.name == RUN_SESSION and attrs(s).get("error.type") == "UNKNOWN_MODEL" for s in spans
        )

    (root,) = [
        s
        for s in await viewer.spans(arrived)
        if s.name == RUN_SESSION and attrs(s).get("error.type") == "UNKNOWN_MODEL"
    ]
    a = attrs(root)
    assert root.status.code == ERROR and "claude-nonexistent-9" in root.status.message
    assert a["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert a["user.id"] == "acme" and a["openinference.span.kind"] == "CHAIN"
    assert list(root.events) == []  # no "AbortError: Locally aborted." with a stack trace


async def test_calls_about_a_session_carry_its_id_and_link_to_its_trace(viewer: Traced) -> None:
    h = viewer.h
    h.sandbox.add_script(
        "reattach", Script(steps=[Step(text="first"), Step(text="later", delay_s=1.0)])
    )
    h.sandbox.add_script("cancelled", Script(steps=[Step(text="never", delay_s=30)]))
    request = session_pb2.RunSessionRequest(
        prompt="[[sandbox:reattach]] go",
        model=MODEL,
        on_disconnect=session_pb2.ON_DISCONNECT_CONTINUE,
        request_id="5d0c2f7e-1b9a-4c3d-8e6f-7a8b9c0d1e2f",
    )
    call = h.sessions.RunSession(request, metadata=h.auth())
    session_id = (await call.read()).session_id
    call.cancel()  # the caller goes away; the session goes on
    rest = [
        e
        async for e in h.sessions.StreamSession(
            session_pb2.StreamSessionRequest(session_id=session_id), metadata=h.auth()
        )
    ]
    assert rest[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    # The same request again: re-attached to the session it started.
    again = [e async for e in h.sessions.RunSession(request, metadata=h.auth())]
    assert again[-1].result.session.id == session_id
    got = await h.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=session_id), metadata=h.auth()
    )
    # Another session, cancelled while it runs.
    running = h.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:cancelled]] go",
            model=MODEL,
            on_disconnect=session_pb2.ON_DISCONNECT_CONTINUE,
        ),
        metadata=h.auth(),
    )
    cancelled_id = (await running.read()).session_id
    await h.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=cancelled_id), metadata=h.auth()
    )
    running.cancel()

    spans = await trace_of(viewer, session_id)
    root = one(spans, RUN_SESSION)
    assert got.trace_id == hexid(root.trace_id)

    def calls(spans: list[trace_pb2.Span]) -> dict[str, trace_pb2.Span]:
        return {
            s.name.rsplit("/", 1)[-1]: s
            for s in spans
            if attrs(s).get("session.id") in (session_id, cancelled_id)
            and s.name.startswith("/agentplane.v1.SessionService/")
            and s.trace_id not in (root.trace_id, cancelled_root.trace_id)
        }

    cancelled_root = one(await trace_of(viewer, cancelled_id), RUN_SESSION)
    found = calls(await viewer.spans(lambda s: len(calls(s)) == 4))
    assert sorted(found) == ["CancelSession", "GetSession", "RunSession", "StreamSession"]
    for name in ("StreamSession", "GetSession", "RunSession"):
        span = found[name]
        assert span.trace_id != root.trace_id  # a trace of its own, linked to the session's
        assert attrs(span)["session.id"] == session_id and attrs(span)["user.id"] == "acme"
        (link,) = span.links
        assert (link.trace_id, link.span_id) == (root.trace_id, root.span_id)
        assert attributes(link.attributes)["session.id"] == session_id
    for name in ("StreamSession", "RunSession"):  # each streamed the session's end
        assert attrs(found[name])["agentplane.session.state"] == "COMPLETE"
    cancel = found["CancelSession"]
    assert attrs(cancel)["session.id"] == cancelled_id
    (link,) = cancel.links
    assert (link.trace_id, link.span_id) == (cancelled_root.trace_id, cancelled_root.span_id)


async def test_the_gateway_logs_one_json_line_per_model_request_with_its_span(
    viewer: Traced,
) -> None:
    h = viewer.h
    h.sandbox.add_script(
        "logged",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Glob", {"pattern": "*"})],
                    usage=Usage(input_tokens=10, output_tokens=5, cache_read_input_tokens=7),
                ),
                Step(text="logged"),
            ]
        ),
    )
    events = await h.run(prompt="[[sandbox:logged]] go")
    final = events[-1].result.session
    spans = await trace_of(viewer, final.id, chats=2)
    chats = {hexid(s.span_id): s for s in spans if s.name.startswith("chat ")}
    lines = [
        line
        for line in viewer.log_lines()
        if line["event"] == "model_request" and line.get("session_id") == final.id
    ]
    rows = await db_requests(viewer, final.id)
    assert len(lines) == len(rows) == len(chats) == 2
    assert {line["span_id"] for line in lines} == set(chats)
    for line in lines:
        chat = attrs(chats[line["span_id"]])
        assert line["trace_id"] == hexid(spans[0].trace_id)
        assert line["logger"] == "agentplane.server.telemetry.observer"
        assert line["tenant"] == "acme" and line["model"] == MODEL
        assert (line["status"], line["outcome"]) == (200, "completed")
        assert line["response_id"] == chat["gen_ai.response.id"]
        assert line["cost_usd"] == chat["agentplane.cost_usd"]
        assert line["duration_ms"] >= 0 and line["max_tokens"] > 0
    first = next(line for line in lines if line["cache_read_input_tokens"] == 7)
    assert (first["input_tokens"], first["output_tokens"]) == (10, 5)
    assert sorted(Decimal(line["cost_usd"]) for line in lines) == sorted(r.cost_usd for r in rows)


# -- without a server ---------------------------------------------------------------------


def test_messages_become_genai_messages_cut_to_the_content_policy() -> None:
    content = ContentPolicy(capture=True, max_chars=300)
    body = {
        "system": [{"type": "text", "text": "S" * 500}],
        "messages": [
            {"role": "user", "content": "old question " * 40},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"p": "/a"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "body"}, {"type": "image"}],
                    }
                ],
            },
        ],
    }
    sent, system = messages.input_messages(json.dumps(body).encode(), content)
    assert sent is not None and system is not None
    parsed = json.loads(sent)
    jsonschema.validate(parsed, INPUT_MESSAGES)
    # The newest messages that fit 300 characters: the old question is left out.
    assert [m["role"] for m in parsed] == ["assistant", "tool"]
    assert parsed[0]["parts"] == [
        {"type": "reasoning", "content": "hmm"},
        {"type": "tool_call", "id": "toolu_1", "name": "Read", "arguments": {"p": "/a"}},
    ]
    assert parsed[1]["parts"] == [
        {"type": "tool_call_response", "id": "toolu_1", "response": "body\n[image]"}
    ]
    (instructions,) = json.loads(system)
    assert instructions == {"type": "text", "content": "S" * 300 + "…"}
    # Only the last message, cut, when even it is too long.
    long_last = {"messages": [{"role": "user", "content": "x" * 1000}]}
    (only,) = json.loads(messages.input_messages(json.dumps(long_last).encode(), content)[0] or "")
    assert only["parts"][0]["content"] == "x" * 300 + "…"
    assert messages.input_messages(b"not json", content) == (None, None)

    streamed = [
        {"type": "text", "text": "let me look"},
        {"type": "tool_use", "id": "toolu_2", "name": "Glob", "input": '{"pattern": "*"}'},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search"},
    ]
    output = json.loads(messages.output_messages(streamed, "tool_use", content))
    jsonschema.validate(output, OUTPUT_MESSAGES)
    assert output[0]["finish_reason"] == "tool_call"
    assert output[0]["parts"][1]["arguments"] == {"pattern": "*"}
    assert output[0]["parts"][2] == {"type": "server_tool_use"}
    expected = {
        "end_turn": "stop",
        "stop_sequence": "stop",
        "max_tokens": "length",
        "refusal": "content_filter",
        "pause_turn": "pause_turn",
        "": "error",
    }
    for stop_reason, reason in expected.items():
        assert messages.finish_reason(stop_reason) == reason


def test_the_sse_parser_keeps_the_reply_only_when_asked() -> None:
    reply = Reply(
        model=MODEL,
        content=[
            {"type": "text", "text": "a longer text than one delta carries"},
            {"type": "tool_use", "id": "toolu_9", "name": "Glob", "input": {"pattern": "**/*"}},
        ],
        stop_reason="tool_use",
        usage=Usage(input_tokens=3, output_tokens=4),
    )
    raw = b"".join(encode_event(name, data) for name, data in reply.events())
    for keep in (False, True):
        parser = SseUsageParser(keep_content=keep)
        for i in range(0, len(raw), 11):
            parser.feed(raw[i : i + 11])
        parser.close()
        facts = parser.response
        assert (facts.id, facts.model, facts.stop_reason) == (reply.id, MODEL, "tool_use")
        assert parser.usage.output_tokens == 4
        if not keep:
            assert facts.content is None
            continue
        assert facts.content is not None
        text, tool = facts.content
        assert text == {"type": "text", "text": "a longer text than one delta carries"}
        assert tool["name"] == "Glob" and json.loads(tool["input"]) == {"pattern": "**/*"}

    kept = ResponseFacts(content=[])
    usage = usage_from_message(json.dumps(reply.message()).encode(), kept)
    assert usage is not None and usage.input_tokens == 3
    assert (kept.id, kept.stop_reason, kept.content) == (reply.id, "tool_use", reply.content)
