"""The sandbox model: scripts, HTTP behaviour, and the real bundled CLI pointed at it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from agentplane.server.model_double import (
    FINISHED_TEXT,
    GREETING,
    HttpFailure,
    SandboxServer,
    Script,
    Step,
    ToolCall,
    Usage,
    load_scripts,
)
from agentplane.server.sandbox.cli_env import SessionDirs, cli_environment
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    Message,
    ResultMessage,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)
from harness import processes

CLI_MARK = "_bundled/claude"


# -- helpers ---------------------------------------------------------------------------


def _cli_children() -> list[int]:
    """Bundled-CLI processes that are descendants of this test process."""
    table = processes()
    parents = {p.pid: p.ppid for p in table}
    cmdlines = {p.pid: p.cmdline.replace(b"\0", b" ").decode(errors="replace") for p in table}

    def descends(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, cmd in cmdlines.items() if CLI_MARK in cmd and descends(pid)]


@pytest.fixture
def no_cli_left() -> Iterator[None]:
    """Fail the test if a CLI process it started is still running afterwards."""
    yield
    deadline = time.monotonic() + 60  # at once, unless the machine is loaded
    while (left := _cli_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"CLI processes left running: {left}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[SandboxServer]:
    server = SandboxServer()
    await server.start()
    yield server
    await server.stop()


def _options(
    sandbox: SandboxServer, dirs: SessionDirs, *, retries: int = 0, tools: list[str] | None = None
) -> ClaudeAgentOptions:
    env = cli_environment(
        dirs,
        base_url=sandbox.base_url,
        api_key="sandbox-key",
        extra={"CLAUDE_CODE_MAX_RETRIES": str(retries)},
    )
    tools = ["Read"] if tools is None else tools
    return ClaudeAgentOptions(
        tools=tools,
        allowed_tools=tools,
        cwd=str(dirs.cwd),
        env=env,
        max_turns=5,
        model="claude-sonnet-4-5",
        system_prompt="You are the agentplane sandbox test agent.",
    )


async def _turn(client: ClaudeSDKClient, prompt: str) -> list[Message]:
    """Send one prompt and collect the messages up to its ResultMessage."""
    await client.query(prompt)
    async with asyncio.timeout(60):
        return [message async for message in client.receive_response()]


async def _session(
    sandbox: SandboxServer, dirs: SessionDirs, *prompts: str, **kw: Any
) -> list[list[Message]]:
    async with ClaudeSDKClient(_options(sandbox, dirs, **kw)) as client:
        turns = [await _turn(client, prompt) for prompt in prompts]
    return turns


def _result(messages: list[Message]) -> ResultMessage:
    results = [m for m in messages if isinstance(m, ResultMessage)]
    assert len(results) == 1, messages
    return results[0]


def _texts(messages: list[Message]) -> list[str]:
    return [
        block.text
        for m in messages
        if isinstance(m, AssistantMessage)
        for block in m.content
        if isinstance(block, TextBlock)
    ]


def _sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def _body(marker: str | None, *, stream: bool = False, assistant_turns: int = 0) -> dict[str, Any]:
    text = f"[[sandbox:{marker}]] please" if marker else "hello sandbox"
    messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
    for _ in range(assistant_turns):
        messages += [
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": "go on"},
        ]
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": stream,
        "messages": messages,
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
    }


# -- the real CLI ----------------------------------------------------------------------


async def test_text_script_through_the_cli(
    sandbox: SandboxServer, session_dirs: SessionDirs, no_cli_left: None
) -> None:
    sandbox.add_script(
        "cli_text",
        Script(
            steps=[Step(text="Plain answer.", usage=Usage(input_tokens=1000, output_tokens=200))]
        ),
    )
    (messages,) = await _session(sandbox, session_dirs, "[[sandbox:cli_text]] Say something.")

    assert _texts(messages) == ["Plain answer."]
    result = _result(messages)
    assert (result.subtype, result.is_error, result.num_turns) == ("success", False, 1)
    assert result.result == "Plain answer."
    # Sonnet 4.5: $3 / $15 per million input / output tokens.
    assert result.total_cost_usd == pytest.approx(1000 * 3e-6 + 200 * 15e-6)
    assert result.usage is not None
    assert (result.usage["input_tokens"], result.usage["output_tokens"]) == (1000, 200)

    (recorded,) = sandbox.find(script="cli_text")
    assert (recorded.method, recorded.path, recorded.query) == ("POST", "/v1/messages", "beta=true")
    assert recorded.stream and recorded.kind == "conversation"
    assert (recorded.step, recorded.attempt, recorded.status) == (0, 1, 200)
    assert recorded.headers["x-api-key"] == "sandbox-key"
    assert recorded.headers["x-claude-code-session-id"] == result.session_id


async def test_tool_script_through_the_cli(
    sandbox: SandboxServer, session_dirs: SessionDirs, no_cli_left: None
) -> None:
    hello = session_dirs.cwd / "hello.txt"
    hello.write_text("hello from the sandbox file\n")
    sandbox.add_script(
        "cli_read",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Read", {"file_path": str(hello)})],
                    usage=Usage(input_tokens=1000, output_tokens=200),
                ),
                Step(text="The file says hello.", usage=Usage(input_tokens=1200, output_tokens=50)),
            ]
        ),
    )
    (messages,) = await _session(sandbox, session_dirs, "[[sandbox:cli_read]] Read hello.txt")

    uses = [
        b
        for m in messages
        if isinstance(m, AssistantMessage)
        for b in m.content
        if isinstance(b, ToolUseBlock)
    ]
    assert [(u.name, u.input) for u in uses] == [("Read", {"file_path": str(hello)})]
    assert uses[0].id.startswith("toolu_")
    results = [
        b
        for m in messages
        if isinstance(m, UserMessage) and isinstance(m.content, list)
        for b in m.content
        if isinstance(b, ToolResultBlock)
    ]
    assert len(results) == 1 and results[0].tool_use_id == uses[0].id
    assert "hello from the sandbox file" in str(results[0].content)
    assert _texts(messages)[-1] == "The file says hello."
    result = _result(messages)
    assert (result.subtype, result.is_error, result.num_turns) == ("success", False, 2)
    assert result.total_cost_usd == pytest.approx(2200 * 3e-6 + 250 * 15e-6)

    first, second = sandbox.find(script="cli_read")
    assert (first.step, second.step) == (0, 1)
    assert second.body is not None
    tool_results = [
        block
        for message in second.body["messages"]
        if message["role"] == "user" and isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "tool_result"
    ]
    assert len(tool_results) == 1 and tool_results[0]["tool_use_id"] == uses[0].id
    assert "hello from the sandbox file" in json.dumps(tool_results[0]["content"])


async def test_500_without_retry_fails_the_turn_then_the_next_turn_succeeds(
    sandbox: SandboxServer, session_dirs: SessionDirs, no_cli_left: None
) -> None:
    """With CLAUDE_CODE_MAX_RETRIES=0 the CLI does not retry: the turn ends with an error.

    The failed turn is left out of the next request's history, so the next prompt asks
    for step 0 again (attempt 2), which succeeds.
    """
    sandbox.add_script(
        "cli_fail_once",
        Script(steps=[Step(text="Recovered.", failures=[HttpFailure(500, should_retry=False)])]),
    )
    failed, recovered = await _session(
        sandbox, session_dirs, "[[sandbox:cli_fail_once]] Try.", "Try again."
    )

    assert not any(isinstance(m, SystemMessage) and m.subtype == "api_retry" for m in failed)
    errors = [m for m in failed if isinstance(m, AssistantMessage)]
    assert [m.error for m in errors] == ["server_error"]
    result = _result(failed)
    assert (result.subtype, result.is_error) == ("success", True)
    assert (result.api_error_status, result.terminal_reason) == (500, "api_error")
    assert result.total_cost_usd == 0
    assert result.result is not None and "500" in result.result

    assert _texts(recovered) == ["Recovered."]
    assert _result(recovered).is_error is False

    recorded = sandbox.find(script="cli_fail_once")
    assert [(r.step, r.attempt, r.status) for r in recorded] == [(0, 1, 500), (0, 2, 200)]
    assert len({r.headers["x-claude-code-session-id"] for r in recorded}) == 1


async def test_fail_always_and_a_retried_failure(
    sandbox: SandboxServer, session_dirs: SessionDirs, no_cli_left: None
) -> None:
    sandbox.add_script(
        "cli_fail_always",
        Script(steps=[Step(text="never", fail_always=HttpFailure(500, should_retry=False))]),
    )
    sandbox.add_script(
        "cli_retried",
        Script(steps=[Step(text="After a retry.", failures=[HttpFailure(529, should_retry=True)])]),
    )
    always, retried = [], []
    async with ClaudeSDKClient(_options(sandbox, session_dirs, retries=1)) as client:
        always = await _turn(client, "[[sandbox:cli_fail_always]] Try.")
    async with ClaudeSDKClient(_options(sandbox, session_dirs, retries=1)) as client:
        retried = await _turn(client, "[[sandbox:cli_retried]] Try.")

    # x-should-retry: false stops the CLI's retries even with retries left.
    result = _result(always)
    assert result.is_error and result.api_error_status == 500
    assert result.terminal_reason == "api_error"
    assert [r.attempt for r in sandbox.find(script="cli_fail_always")] == [1]

    # x-should-retry: true: one api_retry notice, then the retry succeeds in the same turn.
    notices = [m for m in retried if isinstance(m, SystemMessage) and m.subtype == "api_retry"]
    assert [(n.data["attempt"], n.data["error_status"]) for n in notices] == [(1, 529)]
    assert _texts(retried) == ["After a retry."]
    assert _result(retried).is_error is False
    recorded = sandbox.find(script="cli_retried")
    assert [(r.attempt, r.status) for r in recorded] == [(1, 529), (2, 200)]


async def test_side_requests_do_not_consume_the_script(
    session_dirs: SessionDirs, no_cli_left: None
) -> None:
    """set_model() makes the CLI probe the model (max_tokens=1, "Hi", no marker).

    The default script here fails every request, so a probe answered from it would make
    set_model fail.
    """
    script = Script(steps=[Step(text="one"), Step(text="two")])
    default = Script(steps=[Step(fail_always=HttpFailure(400, should_retry=False))])
    server = SandboxServer(scripts={"side": script}, default=default)
    async with server, ClaudeSDKClient(_options(server, session_dirs)) as client:
        first = await _turn(client, "[[sandbox:side]] One.")
        await client.set_model("claude-haiku-4-5")
        second = await _turn(client, "Two.")

    assert (_texts(first), _texts(second)) == (["one"], ["two"])
    assert [(r.kind, r.step) for r in server.requests] == [
        ("conversation", 0),
        ("side", None),
        ("conversation", 1),
    ]
    probe = server.requests[1]
    assert probe.body is not None and probe.body["max_tokens"] == 1 and not probe.stream
    assert probe.body["model"] == "claude-haiku-4-5"
    assert server.requests[2].body is not None
    assert server.requests[2].body["model"] == "claude-haiku-4-5"


async def test_interrupt_releases_a_hanging_model_call(
    sandbox: SandboxServer, session_dirs: SessionDirs, no_cli_left: None
) -> None:
    """A held request ends (handler cancelled) when the CLI abandons it on interrupt()."""
    sandbox.add_script("cli_hang", Script(steps=[Step(hang=True)]))
    async with ClaudeSDKClient(_options(sandbox, session_dirs)) as client:
        await client.query("[[sandbox:cli_hang]] Wait.")
        async with asyncio.timeout(30):
            while sandbox.in_flight == 0:
                await asyncio.sleep(0.02)
        await client.interrupt()
        async with asyncio.timeout(30):
            messages = [m async for m in client.receive_response()]
            while sandbox.in_flight:
                await asyncio.sleep(0.02)

    result = _result(messages)
    assert (result.subtype, result.is_error) == ("error_during_execution", True)
    assert result.terminal_reason == "aborted_streaming"
    (held,) = sandbox.find(script="cli_hang")
    assert (held.step, held.status) == (0, None)


# -- HTTP, without the CLI -------------------------------------------------------------


async def test_non_streaming_count_tokens_and_unknown_paths(sandbox: SandboxServer) -> None:
    sandbox.add_script(
        "http_json",
        Script(
            steps=[
                Step(
                    text="Reading.",
                    tool_calls=[ToolCall("Read", {"file_path": "/x"}, id="toolu_fixed")],
                    usage=Usage(10, 20, 30, 40),
                    model="claude-opus-4-5",
                )
            ]
        ),
    )
    async with aiohttp.ClientSession(sandbox.base_url) as http:
        async with http.post("/v1/messages?beta=true", json=_body("http_json")) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            message = await resp.json()
        async with http.post("/v1/messages", json=_body("http_json", assistant_turns=1)) as resp:
            finished = await resp.json()
        async with http.post("/v1/messages", json=_body(None)) as resp:
            greeting = await resp.json()
        body = _body("http_json")
        async with http.post("/v1/messages/count_tokens", json=body) as resp:
            assert resp.status == 200
            count = await resp.json()
        async with http.get("/v1/models") as resp:
            assert resp.status == 404
            missing = await resp.json()

    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_") and message["model"] == "claude-opus-4-5"
    assert message["content"] == [
        {"type": "text", "text": "Reading."},
        {"type": "tool_use", "id": "toolu_fixed", "name": "Read", "input": {"file_path": "/x"}},
    ]
    assert message["stop_reason"] == "tool_use"
    usage = message["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (10, 20)
    assert (usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]) == (30, 40)

    assert finished["content"] == [{"type": "text", "text": FINISHED_TEXT}]
    assert finished["stop_reason"] == "end_turn" and finished["model"] == "claude-sonnet-4-5"
    assert greeting["content"] == [{"type": "text", "text": GREETING + "hello sandbox"}]
    assert greeting["usage"]["input_tokens"] > 0 and greeting["usage"]["output_tokens"] > 0

    assert count["input_tokens"] == len(json.dumps(body)) // 4
    assert missing["type"] == "error" and missing["error"]["type"] == "not_found_error"
    assert [(r.method, r.path, r.kind, r.status) for r in sandbox.requests[-5:]] == [
        ("POST", "/v1/messages", "conversation", 200),
        ("POST", "/v1/messages", "conversation", 200),
        ("POST", "/v1/messages", "greeting", 200),
        ("POST", "/v1/messages/count_tokens", "count_tokens", 200),
        ("GET", "/v1/models", "unknown", 404),
    ]
    assert [r.step for r in sandbox.requests[-5:-3]] == [0, 1]


async def test_streaming_events(sandbox: SandboxServer) -> None:
    tool_input = {"file_path": "/a/rather/long/path/to/some/file.txt", "limit": 10}
    sandbox.add_script(
        "http_sse",
        Script(
            steps=[
                Step(
                    text="Let me look at that file for you.",
                    tool_calls=[ToolCall("Read", tool_input)],
                    usage=Usage(input_tokens=500, output_tokens=70, cache_read_input_tokens=9),
                )
            ]
        ),
    )
    body = _body("http_sse", stream=True)
    async with (
        aiohttp.ClientSession(sandbox.base_url) as http,
        http.post("/v1/messages", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = _sse_events(await resp.read())

    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == [
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 500 and start["usage"]["output_tokens"] == 1
    assert start["usage"]["cache_read_input_tokens"] == 9
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] == 70

    blocks: dict[int, dict[str, Any]] = {}
    for name, data in events:
        if name == "content_block_start":
            blocks[data["index"]] = {**data["content_block"], "json": ""}
        elif name == "content_block_delta":
            block, d = blocks[data["index"]], data["delta"]
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            else:
                assert d["type"] == "input_json_delta"
                block["json"] += d["partial_json"]
    assert blocks[0]["type"] == "text" and blocks[0]["text"] == "Let me look at that file for you."
    assert blocks[1]["type"] == "tool_use" and blocks[1]["name"] == "Read"
    assert blocks[1]["id"].startswith("toolu_") and json.loads(blocks[1]["json"]) == tool_input
    assert names.count("content_block_delta") > 3  # text and JSON arrive in several chunks
    assert names.count("content_block_stop") == 2


async def test_failures_are_counted_per_session_and_step(sandbox: SandboxServer) -> None:
    sandbox.add_script(
        "http_fail",
        Script(
            steps=[
                Step(
                    text="ok",
                    failures=[
                        HttpFailure(429, should_retry=True, retry_after=2),
                        HttpFailure(529, message="Overloaded"),
                    ],
                ),
                Step(text="never", fail_always=HttpFailure(401, should_retry=False)),
            ]
        ),
    )

    async def post(session: str, turns: int = 0) -> tuple[int, Mapping[str, str], dict[str, Any]]:
        headers = {"X-Claude-Code-Session-Id": session}
        body = _body("http_fail", assistant_turns=turns)
        async with http.post("/v1/messages", json=body, headers=headers) as resp:
            return resp.status, resp.headers.copy(), await resp.json()

    async with aiohttp.ClientSession(sandbox.base_url) as http:
        a1, b1, a2, a3, b2 = [await post(s) for s in ("a", "b", "a", "a", "b")]
        always = await post("a", turns=1)

    assert a1[0] == 429 and a1[1]["x-should-retry"] == "true" and a1[1]["retry-after"] == "2"
    assert a1[2] == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Sandbox scripted failure"},
    }
    assert b1[0] == 429  # another session has its own attempts
    assert a2[0] == 529 and "x-should-retry" not in a2[1]
    assert a2[2]["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert a3[0] == 200 and a3[2]["content"][0]["text"] == "ok"
    assert b2[0] == 529
    assert always[0] == 401 and always[1]["x-should-retry"] == "false"
    assert always[2]["error"]["type"] == "authentication_error"
    attempts = [(r.headers["x-claude-code-session-id"], r.attempt) for r in sandbox.requests[-6:]]
    assert attempts == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("a", 1)]


async def test_concurrent_requests_are_answered_independently(sandbox: SandboxServer) -> None:
    sandbox.add_script("http_slow", Script(steps=[Step(text="slow", delay_s=0.5)]))
    sandbox.add_script("http_fast", Script(steps=[Step(text="fast"), Step(text="fast 2")]))

    async def text(body: dict[str, Any]) -> str:
        async with http.post("/v1/messages", json=body) as resp:
            return str((await resp.json())["content"][0]["text"])

    async with aiohttp.ClientSession(sandbox.base_url) as http:
        started = time.monotonic()
        slow = asyncio.create_task(text(_body("http_slow")))
        while sandbox.in_flight == 0:
            await asyncio.sleep(0.01)
        fast = await text(_body("http_fast", assistant_turns=1))
        assert not slow.done()  # the slow one does not hold up the other
        assert (fast, await slow) == ("fast 2", "slow")
        assert time.monotonic() - started >= 0.5


async def test_drop_stall_and_hang(sandbox: SandboxServer) -> None:
    sandbox.add_script("http_drop", Script(steps=[Step(text="dropped", drop_after_events=3)]))
    sandbox.add_script("http_stall", Script(steps=[Step(text="stalled", stall_after_events=2)]))
    sandbox.add_script("http_hang", Script(steps=[Step(text="hung", hang=True)]))
    short = aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(sandbox.base_url, timeout=short) as http:
        # Dropped: three complete events, then the connection is cut mid-body.
        async with http.post("/v1/messages", json=_body("http_drop", stream=True)) as resp:
            assert resp.status == 200
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert [name for name, _ in _sse_events(received)] == [
            "message_start",
            "ping",
            "content_block_start",
        ]
        # The CLI falls back to a non-streaming request, which is answered normally.
        async with http.post("/v1/messages", json=_body("http_drop")) as resp:
            assert (await resp.json())["content"][0]["text"] == "dropped"

        # Stalled: two events, then nothing until the client gives up.
        async with http.post("/v1/messages", json=_body("http_stall", stream=True)) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            second = await resp.content.readuntil(b"\n\n")
            with pytest.raises(asyncio.TimeoutError):
                await resp.content.readuntil(b"\n\n")
        assert [n for n, _ in _sse_events(first + second)] == ["message_start", "ping"]

        # Hung: no response headers at all.
        with pytest.raises(asyncio.TimeoutError):
            await http.post("/v1/messages", json=_body("http_hang", stream=True))

    await asyncio.sleep(0.1)  # let the server see the client go away
    drop, fallback, stall, hang = sandbox.requests[-4:]
    assert (drop.status, fallback.status, stall.status, hang.status) == (None, 200, None, None)
    assert (drop.stream, fallback.stream, stall.stream, hang.stream) == (True, False, True, True)


async def test_stop_releases_held_connections() -> None:
    script = Script(steps=[Step(hang=True)])
    server = SandboxServer(scripts={"hang": script})
    await server.start()
    async with aiohttp.ClientSession(server.base_url) as http:
        request = asyncio.create_task(http.post("/v1/messages", json=_body("hang")))
        while not server.requests:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await server.stop()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await request
        assert time.monotonic() - started < 1


async def test_delay_before_headers(sandbox: SandboxServer) -> None:
    sandbox.add_script("http_delay", Script(steps=[Step(text="late", delay_s=0.4)]))
    async with aiohttp.ClientSession(sandbox.base_url) as http:
        with pytest.raises(asyncio.TimeoutError):
            await http.post(
                "/v1/messages", json=_body("http_delay"), timeout=aiohttp.ClientTimeout(total=0.1)
            )
        started = time.monotonic()
        async with http.post("/v1/messages", json=_body("http_delay", stream=True)) as resp:
            assert time.monotonic() - started >= 0.4
            assert _sse_events(await resp.read())[-1][0] == "message_stop"


async def test_invalid_body_and_bad_script_names(sandbox: SandboxServer) -> None:
    async with (
        aiohttp.ClientSession(sandbox.base_url) as http,
        http.post("/v1/messages", data=b"not json") as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert sandbox.requests[-1].kind == "invalid" and sandbox.requests[-1].body is None
    with pytest.raises(ValueError, match="must match"):
        sandbox.add_script("has space", Script())


# -- scripts ---------------------------------------------------------------------------


def test_script_round_trip_and_load_scripts(tmp_path: Path) -> None:
    script = Script(
        steps=[
            Step(
                text="Reading.",
                tool_calls=[ToolCall("Read", {"file_path": "/a"}), ToolCall("Bash", {}, id="t1")],
                usage=Usage(1, 2, 3, 4),
                model="claude-haiku-4-5",
                delay_s=0.5,
                failures=[HttpFailure(500, should_retry=False), HttpFailure(429, message="slow")],
                stop_reason="max_tokens",
            ),
            Step(fail_always=HttpFailure(401, error_type="authentication_error", retry_after=1)),
            Step(hang=True),
            Step(text="x", stall_after_events=2, drop_after_events=4),
            Step(),
        ]
    )
    data = script.to_dict()
    assert Script.from_dict(json.loads(json.dumps(data))) == script
    assert data["steps"][4] == {}  # defaults are left out
    assert data["steps"][0]["failures"][0] == {"status": 500, "should_retry": False}

    path = tmp_path / "scripts.json"
    path.write_text(
        json.dumps(
            {
                "read_file": {
                    "steps": [
                        {
                            "tool_calls": [{"name": "Read", "input": {"file_path": "/f"}}],
                            "usage": {"input_tokens": 1000, "output_tokens": 200},
                            "failures": [{"status": 500, "should_retry": False}],
                        },
                        {"text": "Done."},
                    ]
                },
                "copy": data,
            }
        )
    )
    scripts = load_scripts(path)
    assert scripts["copy"] == script
    assert scripts["read_file"] == Script(
        steps=[
            Step(
                tool_calls=[ToolCall("Read", {"file_path": "/f"})],
                usage=Usage(input_tokens=1000, output_tokens=200),
                failures=[HttpFailure(500, should_retry=False)],
            ),
            Step(text="Done."),
        ]
    )
    assert scripts["read_file"].steps[0].effective_stop_reason == "tool_use"
    assert scripts["read_file"].steps[1].effective_stop_reason == "end_turn"

    with pytest.raises(ValueError, match="unknown step field"):
        Script.from_dict({"steps": [{"txt": "typo"}]})
    with pytest.raises(ValueError, match="needs a status"):
        Script.from_dict({"steps": [{"failures": [{}]}]})


def test_cli_serves_until_sigint(tmp_path: Path) -> None:
    scripts = tmp_path / "s.json"
    scripts.write_text(json.dumps({"hi": {"steps": [{"text": "from the file"}]}}))
    code = "from agentplane.server.model_double.cli import main; raise SystemExit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--scripts", str(scripts)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("sandbox model listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        request = urllib.request.Request(
            f"{url}/v1/messages", data=json.dumps(_body("hi")).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["content"][0]["text"] == "from the file"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
