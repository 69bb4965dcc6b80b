"""The metering gateway between the real CLI and the sandbox model (the one double)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from agentplane.server.domain import TokenUsage
from agentplane.server.gateway.meter import (
    IMAGE_TOKENS,
    PDF_PAGE_TOKENS,
    UNSEEN_DOCUMENT_TOKENS,
    MeteredRequest,
    SessionMeter,
    estimate_input_tokens,
)
from agentplane.server.gateway.proxy import MeteringGateway
from agentplane.server.gateway.sse import SseUsageParser
from agentplane.server.model_double import (
    HttpFailure,
    RecordedRequest,
    SandboxServer,
    Script,
    Step,
    ToolCall,
    Usage,
)
from agentplane.server.money.pricing import PriceTable
from agentplane.server.sandbox.cli_env import SessionDirs, cli_environment
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    Message,
    ResultMessage,
)
from harness import processes

PRICES = PriceTable.load()
REAL_KEY = "sk-ant-api03-tenant-" + secrets.token_urlsafe(24)
CLI_MARK = "_bundled/claude"
MSG_ID = re.compile(rb"msg_01[A-Za-z0-9]{22}")


# -- fixtures and helpers ----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway() -> AsyncIterator[MeteringGateway]:
    async with MeteringGateway(PRICES) as gw:
        yield gw


def _processes_with_env(marker: bytes) -> dict[int, bytes]:
    """CLI processes whose environment holds ``marker`` -> their raw environ."""
    cli = CLI_MARK.encode()
    return {p.pid: p.environ for p in processes() if marker in p.env and cli in p.cmdline}


@pytest.fixture
def no_cli_left(session_dirs: SessionDirs) -> Iterator[None]:
    """Fail the test if a CLI of its session is still running afterwards."""
    yield
    marker = f"AGENTPLANE_SESSION_DIR={session_dirs.root}".encode()
    deadline = time.monotonic() + 60  # at once, unless the machine is loaded
    while (left := _processes_with_env(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"CLI processes left running: {list(left)}"


def _open(
    gateway: MeteringGateway, sandbox: SandboxServer, budget: str, name: str | None = None
) -> SessionMeter:
    return gateway.open_session(
        name or f"s-{secrets.token_hex(4)}",
        budget_usd=Decimal(budget),
        upstream_base_url=sandbox.base_url,
        upstream_api_key=REAL_KEY,
    )


def _options(
    gateway: MeteringGateway, meter: SessionMeter, dirs: SessionDirs, *, model: str, max_turns: int
) -> ClaudeAgentOptions:
    env = cli_environment(
        dirs,
        base_url=gateway.base_url,
        api_key=meter.token,
        extra={"CLAUDE_CODE_MAX_RETRIES": "0"},
    )
    return ClaudeAgentOptions(
        tools=["Read"],
        allowed_tools=["Read"],
        cwd=str(dirs.cwd),
        env=env,
        max_turns=max_turns,
        model=model,
        system_prompt="You are the agentplane gateway test agent.",
    )


async def _collect(client: ClaudeSDKClient) -> list[Message]:
    async with asyncio.timeout(60):
        return [message async for message in client.receive_response()]


def _result(messages: list[Message]) -> ResultMessage:
    results = [m for m in messages if isinstance(m, ResultMessage)]
    assert len(results) == 1, messages
    return results[0]


def _body(
    text: str = "hello",
    *,
    model: str = "claude-sonnet-4-5",
    max_tokens: int = 1024,
    stream: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def _cost(model: str, usage: Usage) -> Decimal:
    return PRICES.price(model).cost(TokenUsage(**usage.to_dict()))


def _assert_settled(meter: SessionMeter) -> None:
    assert meter.reserved_usd == 0 and meter.in_flight == 0
    assert meter.spent_usd == sum((r.cost_usd for r in meter.requests), Decimal(0))


async def _post(
    url: str,
    body: dict[str, Any] | bytes,
    *,
    key: str | None,
    path: str = "/v1/messages",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    all_headers = {"anthropic-version": "2023-06-01", **(headers or {})}
    if key is not None:
        all_headers["x-api-key"] = key
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + path, data=data, headers=all_headers) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def _last(sandbox: SandboxServer, count: int = 1) -> list[RecordedRequest]:
    return sandbox.requests[-count:]


# -- the real CLI through the gateway --------------------------------------------------


async def test_cli_session_is_metered_exactly_and_never_sees_the_real_key(
    sandbox: SandboxServer,
    gateway: MeteringGateway,
    session_dirs: SessionDirs,
    no_cli_left: None,
) -> None:
    hello = session_dirs.cwd / "hello.txt"
    hello.write_text("hello through the gateway\n")
    steps = [
        Step(
            tool_calls=[ToolCall("Read", {"file_path": str(hello)})],
            usage=Usage(1000, 200, 300, 400),
        ),
        Step(text="The file says hello.", usage=Usage(1200, 50, 0, 1500)),
    ]
    sandbox.add_script("gw_cli", Script(steps=steps))
    meter = _open(gateway, sandbox, "5")
    model = "claude-sonnet-4-5"
    environs: dict[int, bytes] = {}
    async with ClaudeSDKClient(
        _options(gateway, meter, session_dirs, model=model, max_turns=5)
    ) as client:
        await client.query("[[sandbox:gw_cli]] Read hello.txt")
        messages = await _collect(client)
        # The CLI is still running: look at its environment.
        environs = _processes_with_env(f"AGENTPLANE_SESSION_DIR={session_dirs.root}".encode())
    gateway.close_session(meter.session_id)

    result = _result(messages)
    assert (result.subtype, result.is_error, result.num_turns) == ("success", False, 2)

    # Metered cost == the sandbox's usage numbers x the price table, to the micro-dollar:
    # (1000*3 + 200*15 + 300*3.75 + 400*0.30) + (1200*3 + 50*15 + 1500*0.30) = 12045 u$.
    assert meter.spent_usd == Decimal("0.012045")
    assert meter.spent_usd == sum(_cost(model, s.usage) for s in steps)
    _assert_settled(meter)
    assert [
        (
            r.usage.input_tokens,
            r.usage.output_tokens,
            r.usage.cache_creation_input_tokens,
            r.usage.cache_read_input_tokens,
            r.outcome,
            r.status,
            r.stream,
        )
        for r in meter.requests
    ] == [
        (1000, 200, 300, 400, "completed", 200, True),
        (1200, 50, 0, 1500, "completed", 200, True),
    ]
    # The budget was ample: nothing lowered (the CLI asks 32000 with a 31999 thinking budget
    # for Sonnet 4.5).
    assert all(r.max_tokens_forwarded == r.max_tokens_requested == 32000 for r in meter.requests)
    assert all(r.thinking_budget_forwarded == 31999 for r in meter.requests)
    # The SDK's own estimate agrees (its table has the same Sonnet 4.5 prices).
    assert result.total_cost_usd == pytest.approx(float(meter.spent_usd), rel=1e-9)

    # Upstream got the tenant's key, never the session token; the headers the CLI sends
    # and the ?beta=true query went through.
    recorded = sandbox.find(script="gw_cli")
    assert len(recorded) == 2
    for request in recorded:
        assert request.headers["x-api-key"] == REAL_KEY
        assert "authorization" not in request.headers
        assert meter.token not in json.dumps(request.headers)
        assert request.query == "beta=true" and request.path == "/v1/messages"
        assert request.headers["anthropic-version"] == "2023-06-01"
        assert "claude-code" in request.headers["anthropic-beta"]
        assert request.headers["x-claude-code-session-id"] == result.session_id
        assert request.headers["accept-encoding"] == "identity"

    # The agent process holds the session token, not the tenant's key.
    assert len(environs) == 1, environs
    (environ,) = environs.values()
    assert REAL_KEY.encode() not in environ
    assert f"ANTHROPIC_API_KEY={meter.token}".encode() in environ.split(b"\0")
    assert f"ANTHROPIC_BASE_URL={gateway.base_url}".encode() in environ.split(b"\0")


async def test_small_budget_stops_the_session_with_max_tokens_lowered(
    sandbox: SandboxServer,
    gateway: MeteringGateway,
    session_dirs: SessionDirs,
    no_cli_left: None,
) -> None:
    """Expensive Opus 4.5 turns (1000 in + 500 out = $0.0175 each) against $0.10.

    Input usage is scripted below the gateway's estimate of the CLI's requests, and output
    below the lowest forwarded max_tokens, as the real API would: so the spend stays
    within the budget exactly.
    """
    hello = session_dirs.cwd / "hello.txt"
    hello.write_text("hello\n")
    usage = Usage(input_tokens=1000, output_tokens=500)
    read = Step(tool_calls=[ToolCall("Read", {"file_path": str(hello)})], usage=usage)
    sandbox.add_script("gw_expensive", Script(steps=[read] * 12))
    model = "claude-opus-4-5"
    budget = Decimal("0.10")
    meter = _open(gateway, sandbox, str(budget))
    async with ClaudeSDKClient(
        _options(gateway, meter, session_dirs, model=model, max_turns=20)
    ) as client:
        await client.query("[[sandbox:gw_expensive]] Keep reading hello.txt.")
        messages = await _collect(client)
    gateway.close_session(meter.session_id)

    result = _result(messages)
    assert result.is_error and result.api_error_status == 400
    assert result.terminal_reason == "api_error"
    assert "session budget exhausted" in (result.result or "")
    errors = [m.error for m in messages if isinstance(m, AssistantMessage) and m.error]
    assert len(errors) == 1  # the CLI classifies this 400 as "unknown"

    assert meter.exhausted
    _assert_settled(meter)
    forwarded = [r for r in meter.requests if r.outcome == "completed"]
    refused = [r for r in meter.requests if r.outcome == "refused"]
    assert meter.requests == forwarded + refused and len(forwarded) == 5
    # The CLI sends a request that got a 400 up to twice more, with fewer betas each time.
    assert 1 <= len(refused) <= 3
    assert all((r.status, r.cost_usd, r.max_tokens_forwarded) == (400, 0, None) for r in refused)
    assert meter.spent_usd == 5 * _cost(model, usage) == Decimal("0.0875")
    # The documented bound: spend <= budget + what the input estimate missed (here
    # nothing: every response's input is within its estimate).
    missed = sum(
        max(
            0,
            r.usage.input_tokens
            + r.usage.cache_creation_input_tokens
            + r.usage.cache_read_input_tokens
            - r.input_tokens_estimate,
        )
        for r in forwarded
    )
    assert missed == 0
    assert meter.spent_usd <= budget

    # The CLI asked for 32000 every time; every forwarded max_tokens was lowered to the
    # remaining budget, shrinking turn by turn, and the thinking budget with it.
    assert all(r.max_tokens_requested == 32000 for r in meter.requests)
    lowered = [r.max_tokens_forwarded for r in forwarded]
    assert lowered == sorted(lowered, reverse=True) and all(
        n is not None and 512 <= n < 32000 for n in lowered
    )
    assert all(r.reserved_usd <= budget for r in forwarded)
    sent = sandbox.find(script="gw_expensive")
    assert len(sent) == len(forwarded)  # the refused request never reached upstream
    assert [r.body["max_tokens"] for r in sent if r.body] == lowered
    last = sent[-1].body
    assert last is not None and last["max_tokens"] == forwarded[-1].max_tokens_forwarded < 32000
    for request, record in zip(sent, forwarded, strict=True):
        assert request.body is not None
        thinking = request.body.get("thinking")
        if thinking is None:  # dropped: below the API's 1024-token minimum
            assert record.max_tokens_forwarded is not None
            assert record.max_tokens_forwarded <= 1024
            assert record.thinking_budget_forwarded is None
        else:
            assert thinking["budget_tokens"] == request.body["max_tokens"] - 1
            assert thinking["budget_tokens"] == record.thinking_budget_forwarded
    assert any("thinking" not in r.body for r in sent if r.body)


# -- HTTP, without the CLI -------------------------------------------------------------


async def test_thinking_budget_is_lowered_below_max_tokens(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    context = {
        "edits": [
            {"type": "clear_thinking_20251015", "keep": "all"},
            {"type": "clear_tool_uses_20250919"},
        ]
    }
    thinking = {"type": "enabled", "budget_tokens": 31999, "display": "updates"}
    body = _body(max_tokens=32000, thinking=thinking, context_management=context)

    # Room for about 5000 output tokens: thinking gets max_tokens - 1.
    roomy = _open(gateway, sandbox, "0.075")
    status, _, _ = await _post(gateway.base_url, body, key=roomy.token)
    assert status == 200
    sent = _last(sandbox)[0].body
    assert sent is not None
    (record,) = roomy.requests
    assert record.max_tokens_forwarded is not None
    assert 4900 < sent["max_tokens"] == record.max_tokens_forwarded < 5000
    assert sent["thinking"] == {**thinking, "budget_tokens": sent["max_tokens"] - 1}
    assert (record.thinking_budget_requested, record.thinking_budget_forwarded) == (
        31999,
        sent["max_tokens"] - 1,
    )
    assert sent["context_management"] == context
    assert sent["messages"] == body["messages"] and sent["model"] == body["model"]

    # Room for fewer than 1025: thinking (minimum 1024) is dropped, and with it the
    # context edit that needs thinking on.
    tight = _open(gateway, sandbox, "0.012")
    status, _, _ = await _post(gateway.base_url, body, key=tight.token)
    assert status == 200
    sent = _last(sandbox)[0].body
    assert sent is not None and 512 <= sent["max_tokens"] <= 1024
    assert "thinking" not in sent
    assert sent["context_management"] == {"edits": [{"type": "clear_tool_uses_20250919"}]}
    assert tight.requests[0].thinking_budget_forwarded is None

    # A thinking budget already below the lowered max_tokens is left alone.
    small = {"type": "enabled", "budget_tokens": 2000}
    status, _, _ = await _post(gateway.base_url, {**body, "thinking": small}, key=roomy.token)
    assert status == 200
    sent = _last(sandbox)[0].body
    assert sent is not None and sent["thinking"] == small and sent["max_tokens"] < 32000
    for meter in (roomy, tight):
        gateway.close_session(meter.session_id)
        _assert_settled(meter)


async def test_unknown_model_is_refused(sandbox: SandboxServer, gateway: MeteringGateway) -> None:
    meter = _open(gateway, sandbox, "1")
    before = len(sandbox.requests)
    status, headers, raw = await _post(
        gateway.base_url, _body(model="claude-fable-9"), key=meter.token
    )
    assert status == 400 and headers["x-should-retry"] == "false"
    assert json.loads(raw) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "model claude-fable-9 is not in agentplane's price table "
            "(version 2026-12-08)",
        },
    }
    assert len(sandbox.requests) == before  # never forwarded
    (record,) = meter.requests
    assert (record.model, record.outcome, record.status, record.cost_usd) == (
        "claude-fable-9",
        "refused",
        400,
        0,
    )
    assert not meter.exhausted
    gateway.close_session(meter.session_id)


async def test_bad_and_closed_tokens_get_401(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    meter = _open(gateway, sandbox, "1")
    url = gateway.base_url
    before = len(sandbox.requests)
    for key in (None, "", "not-a-session-token", REAL_KEY):
        status, headers, raw = await _post(url, _body(), key=key)
        assert status == 401 and headers["x-should-retry"] == "false"
        assert json.loads(raw)["error"]["type"] == "authentication_error"
        assert REAL_KEY.encode() not in raw
    assert len(sandbox.requests) == before

    # `Authorization: Bearer` works like x-api-key; neither goes upstream.
    bearer = {"authorization": f"Bearer {meter.token}"}
    status, _, _ = await _post(url, _body(), key=None, headers=bearer)
    assert status == 200
    (forwarded,) = _last(sandbox)
    assert forwarded.headers["x-api-key"] == REAL_KEY and "authorization" not in forwarded.headers

    # count_tokens is forwarded for free; other paths are 404.
    body = _body("count these")
    raw_body = json.dumps(body).encode()
    status, _, raw = await _post(url, raw_body, key=meter.token, path="/v1/messages/count_tokens")
    assert status == 200 and json.loads(raw) == {"input_tokens": len(raw_body) // 4}
    assert _last(sandbox)[0].kind == "count_tokens"
    assert _last(sandbox)[0].headers["x-api-key"] == REAL_KEY
    status, _, raw = await _post(url, body, key=meter.token, path="/v1/models")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    assert len(meter.requests) == 1

    assert gateway.close_session(meter.session_id) is meter and meter.closed
    status, headers, _ = await _post(url, _body(), key=meter.token)
    assert status == 401 and headers["x-should-retry"] == "false"
    assert gateway.close_session(meter.session_id) is None
    _assert_settled(meter)


async def test_sse_and_json_pass_through_byte_for_byte(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    usage = Usage(
        input_tokens=500,
        output_tokens=70,
        cache_creation_input_tokens=9,
        cache_read_input_tokens=11,
    )
    step = Step(
        text="Let me look at that file for you, in several text deltas.",
        tool_calls=[ToolCall("Read", {"file_path": "/a/long/path/to/a/file.txt"}, id="toolu_x")],
        usage=usage,
    )
    sandbox.add_script("gw_sse", Script(steps=[step]))
    meter = _open(gateway, sandbox, "1")
    for stream in (True, False):
        body = _body("[[sandbox:gw_sse]] read it", stream=stream, max_tokens=4096)
        direct_status, direct_headers, direct = await _post(sandbox.base_url, body, key="k")
        status, headers, metered = await _post(gateway.base_url, body, key=meter.token)
        assert status == direct_status == 200
        assert headers["content-type"] == direct_headers["content-type"]
        assert headers["request-id"].startswith("req_")  # upstream's headers come along
        # Identical but for the message id, which the sandbox draws at random.
        assert len(metered) == len(direct) and metered.count(b"msg_01") == 1
        assert MSG_ID.sub(b"msg_ID", metered) == MSG_ID.sub(b"msg_ID", direct)
    assert headers["content-type"] == "application/json; charset=utf-8"

    model = "claude-sonnet-4-5"
    streamed, plain = meter.requests
    for record in (streamed, plain):
        assert (record.usage.input_tokens, record.usage.output_tokens) == (500, 70)
        assert (record.usage.cache_creation_input_tokens, record.usage.cache_read_input_tokens) == (
            9,
            11,
        )
        assert record.cost_usd == _cost(model, usage) == Decimal("0.002587")  # 2587.05 u$
        assert record.outcome == "completed" and record.max_tokens_forwarded == 4096
        assert record.upstream_request_id.startswith("req_")
    assert (streamed.stream, plain.stream) == (True, False)
    assert meter.spent_usd == 2 * _cost(model, usage)
    gateway.close_session(meter.session_id)
    _assert_settled(meter)


async def test_upstream_errors_pass_through_and_cost_nothing(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    sandbox.add_script(
        "gw_500", Script(steps=[Step(fail_always=HttpFailure(500, should_retry=False))])
    )
    sandbox.add_script(
        "gw_429",
        Script(steps=[Step(fail_always=HttpFailure(429, should_retry=True, retry_after=7))]),
    )
    meter = _open(gateway, sandbox, "1")
    for name, status, retry in (("gw_500", 500, "false"), ("gw_429", 429, "true")):
        body = _body(f"[[sandbox:{name}]] fail", stream=True)
        direct = await _post(sandbox.base_url, body, key="k")
        metered = await _post(gateway.base_url, body, key=meter.token)
        assert metered[0] == direct[0] == status
        assert metered[1]["x-should-retry"] == retry
        assert metered[2] == direct[2]
        assert metered[1]["content-type"] == "application/json; charset=utf-8"
    assert metered[1]["retry-after"] == "7"
    assert [(r.status, r.outcome, r.cost_usd) for r in meter.requests] == [
        (500, "upstream_error", 0),
        (429, "upstream_error", 0),
    ]
    assert meter.spent_usd == 0 and not meter.exhausted

    # No upstream at all (refused): a 502 the CLI must not retry for minutes, naming the
    # URL; nothing charged; the gateway tells its watcher.
    heard: list[bool] = []
    gateway.on_upstream = heard.append
    dead = gateway.open_session(
        "s-dead",
        budget_usd=Decimal(1),
        upstream_base_url="http://127.0.0.1:9",
        upstream_api_key=REAL_KEY,
    )
    status, headers, raw = await _post(gateway.base_url, _body(), key=dead.token)
    assert status == 502 and headers["x-should-retry"] == "false"
    error = json.loads(raw)["error"]
    assert error["type"] == "api_error"
    assert "the model API at http://127.0.0.1:9 cannot be reached" in error["message"]
    assert heard == [False]
    assert REAL_KEY.encode() not in raw
    assert (dead.requests[0].outcome, dead.spent_usd) == ("upstream_failed", 0)
    for m in (meter, dead):
        gateway.close_session(m.session_id)
        _assert_settled(m)


async def test_concurrent_requests_never_jointly_exceed_the_budget(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    usage = Usage(input_tokens=100, output_tokens=100)
    sandbox.add_script("gw_slow", Script(steps=[Step(text="slow", delay_s=0.5, usage=usage)]))
    budget = Decimal("0.1")
    meter = _open(gateway, sandbox, str(budget))
    seen: list[MeteredRequest] = []
    meter.on_request = seen.append
    body = _body("[[sandbox:gw_slow]] hi", max_tokens=2000)  # worst case ~$0.030
    before = len(sandbox.requests)
    results = await asyncio.gather(
        *(_post(gateway.base_url, body, key=meter.token) for _ in range(10))
    )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 4 + [400] * 6
    refused = [json.loads(raw) for status, _, raw in results if status == 400]
    assert all(e["error"]["message"] == "session budget exhausted" for e in refused)
    assert meter.exhausted

    forwarded = [r for r in meter.requests if r.outcome == "completed"]
    assert len(forwarded) == 4 and seen == meter.requests
    # All four were in flight together, and their reservations fit the budget together.
    assert max(r.started_at for r in forwarded) < min(r.ended_at for r in forwarded if r.ended_at)
    assert sum((r.reserved_usd for r in forwarded), Decimal(0)) <= budget
    sizes = sorted((r.max_tokens_forwarded or 0 for r in forwarded), reverse=True)
    assert sizes[:3] == [2000] * 3 and 512 <= sizes[3] < 2000
    assert sorted((r.body or {})["max_tokens"] for r in sandbox.requests[before:]) == sorted(sizes)
    assert meter.spent_usd == 4 * _cost("claude-sonnet-4-5", usage)
    gateway.close_session(meter.session_id)
    _assert_settled(meter)


async def test_client_disconnect_and_upstream_drop_settle_what_was_seen(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    usage = Usage(input_tokens=700, output_tokens=300, cache_read_input_tokens=50)
    sandbox.add_script(
        "gw_stall", Script(steps=[Step(text="x" * 64, usage=usage, stall_after_events=2)])
    )
    sandbox.add_script(
        "gw_drop", Script(steps=[Step(text="y" * 64, usage=usage, drop_after_events=4)])
    )
    model = "claude-sonnet-4-5"
    seen = Usage(input_tokens=700, output_tokens=1, cache_read_input_tokens=50)  # message_start
    meter = _open(gateway, sandbox, "1")
    headers = {"x-api-key": meter.token}

    async with aiohttp.ClientSession() as http:
        # The agent goes away mid-stream (an interrupt): upstream is closed too.
        body = _body("[[sandbox:gw_stall]] go", stream=True)
        async with http.post(gateway.base_url + "/v1/messages", json=body, headers=headers) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"event: message_start")
            await resp.content.readuntil(b"\n\n")
            resp.close()
        async with asyncio.timeout(5):
            while meter.in_flight or sandbox.in_flight:
                await asyncio.sleep(0.02)
        assert meter.requests[-1].outcome == "client_disconnected"
        assert meter.requests[-1].cost_usd == _cost(model, seen)

        # Upstream breaks off: the agent's stream breaks off the same way.
        body = _body("[[sandbox:gw_drop]] go", stream=True)
        received = b""
        async with http.post(gateway.base_url + "/v1/messages", json=body, headers=headers) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert received.count(b"event: ") == 4
        async with asyncio.timeout(5):
            while meter.in_flight:
                await asyncio.sleep(0.02)
        assert meter.requests[-1].outcome == "upstream_dropped"
        assert meter.requests[-1].cost_usd == _cost(model, seen)
    assert meter.spent_usd == 2 * _cost(model, seen)
    gateway.close_session(meter.session_id)
    _assert_settled(meter)


async def test_open_session_checks(sandbox: SandboxServer, gateway: MeteringGateway) -> None:
    meter = _open(gateway, sandbox, "1", name="s-twice")
    with pytest.raises(ValueError, match="already has an open meter"):
        _open(gateway, sandbox, "1", name="s-twice")
    with pytest.raises(ValueError, match="no upstream API key"):
        gateway.open_session(
            "s-nokey",
            budget_usd=Decimal(1),
            upstream_base_url=sandbox.base_url,
            upstream_api_key="",
        )
    assert gateway.meter("s-twice") is meter
    assert REAL_KEY not in repr(meter) and meter.token not in repr(meter)
    assert len(meter.token) >= 40 and meter.token != _open(gateway, sandbox, "1").token
    gateway.close_session("s-twice")
    assert gateway.meter("s-twice") is None
    assert os.environ.get("ANTHROPIC_API_KEY") != REAL_KEY


# -- the pieces, without servers -------------------------------------------------------


def _estimate(body: dict[str, Any], margin: float = 0) -> int:
    """The estimate of `body` as the CLI sends it (JSON, non-ASCII as UTF-8)."""
    return estimate_input_tokens(json.dumps(body, ensure_ascii=False).encode(), body, margin)


def pdf(pages: int, *, filler: int = 0) -> bytes:
    """A small PDF of `pages` blank pages (uncompressed objects, as simple writers make
    them), with `filler` bytes of comment to make it larger."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>",
        *["<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * pages,
    ]
    out = b"%PDF-1.4\n%" + b"x" * filler + b"\n"
    offsets = []
    for number, text in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{text}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    trailer = f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out + trailer.encode()


def _document(data: bytes) -> dict[str, Any]:
    return {
        "type": "document",
        "source": {
            "type": "base64",
            "media_type": "application/pdf",
            "data": base64.b64encode(data).decode(),
        },
    }


def _with_blocks(*blocks: dict[str, Any]) -> dict[str, Any]:
    body = _body("see")
    body["messages"].append({"role": "user", "content": list(blocks)})
    return body


def test_input_estimate() -> None:
    body = _body("hello " * 100, system="You are terse.", tools=[{"name": "Read"}])
    raw = json.dumps(body).encode()
    # Text: the raw body's characters / 4, times 1 + margin.
    assert estimate_input_tokens(raw, body, 0.2) == math.ceil(len(raw) * 1.2 / 4)
    assert estimate_input_tokens(raw, body, 0) == math.ceil(len(raw) / 4)
    # Non-ASCII text counts at least as its \uXXXX escapes: 6 characters each.
    assert _estimate(_body("日本語" * 100)) > 300 * 6 / 4
    # A base64 image counts as IMAGE_TOKENS, not as its data; so does one by URL.
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "A" * 400_000},
    }
    result = {"type": "tool_result", "tool_use_id": "t", "content": [image]}
    assert IMAGE_TOKENS < _estimate(_with_blocks(result)) < IMAGE_TOKENS + 100
    by_url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    assert IMAGE_TOKENS < _estimate(_with_blocks(by_url)) < IMAGE_TOKENS + 100


def test_input_estimate_counts_documents() -> None:
    text = _estimate(_with_blocks())
    # A small PDF counts PDF_PAGE_TOKENS per page, far above its bytes / 4.
    one, five = _document(pdf(1)), _document(pdf(5))
    assert len(one["source"]["data"]) / 4 < 200
    assert PDF_PAGE_TOKENS < _estimate(_with_blocks(one)) - text < PDF_PAGE_TOKENS + 100
    assert 5 * PDF_PAGE_TOKENS < _estimate(_with_blocks(five)) - text < 5 * PDF_PAGE_TOKENS + 100
    # Nested in a tool result (the CLI's Read of a PDF), it counts the same.
    nested = {"type": "tool_result", "tool_use_id": "t", "content": [five]}
    assert _estimate(_with_blocks(nested)) - text > 5 * PDF_PAGE_TOKENS
    # A large PDF counts by its size: its base64 data / 4.
    big = _document(pdf(2, filler=400_000))
    data = len(big["source"]["data"])
    assert data / 4 < _estimate(_with_blocks(big)) - text < data / 4 + 100
    # A text document counts as its text; a document of content blocks, by its blocks.
    plain = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "word " * 4000},
    }
    assert 5000 < _estimate(_with_blocks(plain)) - text < 5100
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A"}}
    content = {"type": "document", "source": {"type": "content", "content": [image]}}
    assert IMAGE_TOKENS < _estimate(_with_blocks(content)) - text < IMAGE_TOKENS + 100
    # A document the gateway cannot see counts as the API's largest.
    for source in (
        {"type": "url", "url": "https://example.com/a.pdf"},
        {"type": "file", "file_id": "f"},
    ):
        unseen = {"type": "document", "source": source}
        assert _estimate(_with_blocks(unseen)) - text >= UNSEEN_DOCUMENT_TOKENS
    # A block type spelled with an escape is still found.
    escaped = json.dumps(_with_blocks(five)).replace('"document"', '"\\u0064ocument"')
    assert _estimate(_with_blocks(five)) <= estimate_input_tokens(
        escaped.encode(), json.loads(escaped), 0
    )
    # The model's own tool input is text, even when it looks like a document.
    use = {"type": "tool_use", "id": "t", "name": "x", "input": {"doc": unseen}}
    assert _estimate(_with_blocks(use)) - text < 100


def test_sse_usage_parser_on_any_chunking() -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 500,
                "cache_creation_input_tokens": 9,
                "cache_read_input_tokens": 11,
                "output_tokens": 1,
                "cache_creation": {"ephemeral_1h_input_tokens": 4},
            }
        },
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"input_tokens": 500, "output_tokens": 70},
    }
    frames = [
        ("message_start", start),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hi\n\nthere"},
            },
        ),
        ("message_delta", delta),
        ("message_stop", {"type": "message_stop"}),
    ]
    for newline in (b"\n", b"\r\n"):
        raw = b"".join(
            b"event: "
            + name.encode()
            + newline
            + b"data: "
            + json.dumps(data).encode()
            + newline
            + newline
            for name, data in frames
        )
        for size in (1, 7, len(raw)):
            parser = SseUsageParser()
            for i in range(0, len(raw), size):
                parser.feed(raw[i : i + size])
            parser.close()
            assert parser.saw_usage and parser.saw_stop and parser.error is None
            assert parser.usage == TokenUsage(500, 70, 9, 11, 4)
    error = SseUsageParser()
    error.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}')
    error.close()
    assert error.error == {"type": "overloaded_error"} and not error.saw_usage
