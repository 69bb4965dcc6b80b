"""Live text: with include_partial_messages the stream carries text deltas as the model
streams them; they are not numbered, not persisted and not replayed."""

from __future__ import annotations

import json
from collections import defaultdict

import grpc
import pytest
from agentplane.server.model_double import Script, Step, ToolCall
from agentplane.server.store.engine import sessionmaker
from agentplane.server.store.models import EventRow
from agentplane.v1 import session_pb2
from harness import MODEL, TOKENS, Harness
from sqlalchemy import select

pytestmark = pytest.mark.asyncio

LONG = "Streaming text arrives in pieces, sixteen characters at a time from the sandbox."
LOOKUP = session_pb2.CallerTool(name="lookup", input_schema_json=json.dumps({"type": "object"}))


def kinds(events: list[session_pb2.SessionEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


def numbered(events: list[session_pb2.SessionEvent]) -> list[session_pb2.SessionEvent]:
    return [e for e in events if e.WhichOneof("kind") != "text_delta"]


def assembled(events: list[session_pb2.SessionEvent]) -> dict[str, str]:
    """The deltas' text joined per message."""
    text: dict[str, str] = defaultdict(str)
    for e in events:
        if e.HasField("text_delta"):
            text[e.text_delta.message_id] += e.text_delta.text
    return dict(text)


async def test_deltas_stream_before_their_text_and_are_never_replayed(harness: Harness) -> None:
    harness.sandbox.add_script(
        "live_text",
        Script(
            steps=[
                Step(
                    text="First, a look.", tool_calls=[ToolCall("Read", {"file_path": "hello.txt"})]
                ),
                Step(text=LONG),
            ]
        ),
    )
    events = await harness.run(prompt="[[sandbox:live_text]] go", include_partial_messages=True)
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    deltas = [e for e in events if e.HasField("text_delta")]
    assert len(deltas) >= 1 + len(LONG) // 16, "the text came in several pieces"
    assert all(d.seq == 0 and d.session_id == events[0].session_id for d in deltas)
    assert [e.seq for e in numbered(events)] == list(range(1, len(numbered(events)) + 1))
    # Each message's deltas add up to its text, and come before its assistant_text event.
    assert sorted(assembled(events).values()) == sorted(["First, a look.", LONG])
    assert len(assembled(events)) == 2 and all(assembled(events))
    order = kinds(events)
    for text in ("First, a look.", LONG):
        at = next(i for i, e in enumerate(events) if e.assistant_text.text == text)
        assert "text_delta" in order[:at]
        last_delta = max(
            i
            for i, e in enumerate(events)
            if e.HasField("text_delta") and text.endswith(e.text_delta.text)
        )
        assert last_delta < at

    replay = [
        e
        async for e in harness.sessions.StreamSession(
            session_pb2.StreamSessionRequest(session_id=events[0].session_id),
            metadata=harness.auth(),
        )
    ]
    assert replay == numbered(events)
    async with sessionmaker(harness.app.engine)() as db:
        stored = (
            await db.scalars(
                select(EventRow.kind).where(EventRow.session_id == events[0].session_id)
            )
        ).all()
    assert "text_delta" not in stored and len(stored) == len(numbered(events))


async def test_without_the_flag_there_are_no_deltas(harness: Harness) -> None:
    harness.sandbox.add_script("no_deltas", Script(steps=[Step(text=LONG)]))
    events = await harness.run(prompt="[[sandbox:no_deltas]] go")
    assert "text_delta" not in kinds(events)
    assert [e.assistant_text.text for e in events if e.HasField("assistant_text")] == [LONG]


async def test_a_watcher_that_attaches_on_the_owner_gets_the_deltas_from_then_on(
    harness: Harness,
) -> None:
    # The session waits for its caller's tool: a watcher attaches meanwhile.
    harness.sandbox.add_script(
        "live_watch",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "x"})]),
                Step(text=LONG),
            ]
        ),
    )
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:live_watch]] go",
            model=MODEL,
            tools=[LOOKUP],
            include_partial_messages=True,
        ),
        metadata=harness.auth("loop"),
    )
    mine = []
    while not (mine and mine[-1].HasField("input_request")):
        mine.append(await call.read())
    session_id = mine[0].session_id
    watch = harness.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=session_id), metadata=harness.auth("loop")
    )
    theirs = []
    while not (theirs and theirs[-1].HasField("input_request")):
        theirs.append(await watch.read())
    await harness.sessions.Respond(
        session_pb2.RespondRequest(
            session_id=session_id,
            request_id=mine[-1].input_request.request_id,
            tool_result=session_pb2.ToolCallResult(text="found"),
        ),
        metadata=harness.auth("loop"),
    )
    while (event := await call.read()) is not grpc.aio.EOF:
        mine.append(event)
    while (event := await watch.read()) is not grpc.aio.EOF:
        theirs.append(event)
    assert mine[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert list(assembled(mine).values()) == [LONG]
    assert numbered(theirs) == numbered(mine)
    assert [e for e in theirs if e.HasField("text_delta")] == [
        e for e in mine if e.HasField("text_delta")
    ]


async def test_the_python_client_asks_for_live_text(harness: Harness) -> None:
    from agentplane import AsyncClient

    harness.sandbox.add_script("client_live", Script(steps=[Step(text=LONG)]))
    async with AsyncClient(f"127.0.0.1:{harness.app.port}", token=TOKENS["acme"]) as client:
        events = [
            e
            async for e in client.run(
                "[[sandbox:client_live]] go", model=MODEL, include_partial_messages=True
            )
        ]
        plain = [e async for e in client.run("[[sandbox:client_live]] again", model=MODEL)]
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == LONG
    assert not [e for e in plain if e.HasField("text_delta")]
