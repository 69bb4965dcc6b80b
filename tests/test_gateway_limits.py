"""The gateway bounds what it reads: a body cap (413 before buffering), a few reads per
session (then a wait, then 429), and large bodies parsed in a worker process.

Real gateway, real sandbox model, real HTTP over loopback sockets; the flood from inside
a session's sandbox is in test_gateway_flood.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from agentplane.server.gateway.limits import ReadSlots
from agentplane.server.gateway.meter import SessionMeter
from agentplane.server.gateway.parse import BodyParser, ParseFailed, inspect
from agentplane.server.gateway.proxy import MeteringGateway
from agentplane.server.model_double import SandboxServer
from agentplane.server.money.pricing import PriceTable
from harness import processes
from test_gateway import _document, _with_blocks, pdf

CAP = 1024 * 1024
OFF_LOOP = 64 * 1024  # bodies above it are parsed in a worker process
PRICES = PriceTable.load()
KEY = "sk-ant-api03-tenant-" + secrets.token_urlsafe(24)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway() -> AsyncIterator[MeteringGateway]:
    async with MeteringGateway(PRICES, max_body_bytes=CAP, parse_off_loop_bytes=OFF_LOOP) as gw:
        yield gw


def _open(gateway: MeteringGateway, sandbox: SandboxServer, budget: str = "1") -> SessionMeter:
    return gateway.open_session(
        f"s-{secrets.token_hex(4)}",
        budget_usd=Decimal(budget),
        upstream_base_url=sandbox.base_url,
        upstream_api_key=KEY,
    )


def _request(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


async def _post(
    gateway: MeteringGateway, token: str, data: Any, path: str = "/v1/messages"
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gateway.base_url + path, data=data, headers={"x-api-key": token}) as reply,
    ):
        headers = {name.lower(): value for name, value in reply.headers.items()}
        return reply.status, headers, json.loads(await reply.read())


async def _chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """`total` bytes as a chunked body (aiohttp sends an async iterator without a length)."""
    for start in range(0, total, size):
        yield b" " * min(size, total - start)


class RawRequest:
    """A request written by hand on its own connection: the headers (with a declared
    Content-Length) and as much of the body as the test chooses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def send(
        cls, gateway: MeteringGateway, token: str, body: bytes, *, declared: int | None = None
    ) -> RawRequest:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        head = (
            "POST /v1/messages HTTP/1.1\r\nHost: gateway\r\n"
            f"x-api-key: {token}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body) if declared is None else declared}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        return cls(reader, writer)

    async def finish(self, rest: bytes) -> None:
        self.writer.write(rest)
        await self.writer.drain()

    async def reply(self) -> tuple[int, dict[str, Any]]:
        """The status and JSON body of the answer (the server may keep the connection)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = await self.reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), json.loads(body)

    def close(self) -> None:
        self.writer.close()


async def _until(condition: Any, what: str) -> None:
    """Wait (on the server's own state, up to 30 s) until `condition()` holds."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


# -- the body cap ----------------------------------------------------------------------------


async def test_a_body_over_the_cap_is_refused_413_before_it_is_read(
    sandbox: SandboxServer, gateway: MeteringGateway, caplog: pytest.LogCaptureFixture
) -> None:
    meter = _open(gateway, sandbox, budget="5")  # covers a body of 1 MiB
    # Only the headers are sent: the 413 comes from the declared length alone.
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/mcp/crm/mcp"):
        for _ in range(3):
            request = await RawRequest.send(gateway, meter.token, b"", declared=CAP + 1)
            request.writer.write(b"")  # (nothing more: the body never comes)
            status, body = await request.reply()
            request.close()
            assert status == 413, (path, body)
            assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
            assert f"{CAP + 1:,} bytes" in body["error"]["message"]
            assert f"limit of {CAP:,} bytes" in body["error"]["message"]
    # A chunked body has no length to check: the gateway counts and stops at the cap.
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/mcp/crm/mcp"):
        status, headers, body = await _post(gateway, meter.token, _chunks(3 * CAP), path)
        assert status == 413 and body["error"]["type"] == "request_too_large", path
        assert headers["x-should-retry"] == "false"
    # Refusals cost nothing, record nothing and are logged once per session, not each.
    assert meter.requests == [] and meter.spent_usd == 0
    refusals = [r for r in caplog.records if "over" in r.getMessage() and "413" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    # A body of exactly the cap is read and metered as usual.
    raw = json.dumps(_request()).encode()
    at_cap = raw[:-1] + b" " * (CAP - len(raw)) + b"}"
    status, _, body = await _post(gateway, meter.token, at_cap)
    assert len(at_cap) == CAP and status == 200 and body["type"] == "message"
    assert [r.outcome for r in meter.requests] == ["completed"]


async def test_a_large_body_is_metered_like_a_small_one(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    # Above OFF_LOOP: inspected, and re-encoded with max_tokens lowered, in a worker process.
    big = _with_blocks(_document(pdf(3, filler=600_000)))
    raw = json.dumps(big).encode()
    assert OFF_LOOP < len(raw) <= CAP
    estimate = inspect(raw, gateway.input_margin).input_tokens_estimate
    budget = PRICES.price("claude-sonnet-4-5").worst_case(estimate, 700)
    meter = _open(gateway, sandbox, budget=str(budget))
    status, _, _ = await _post(gateway, meter.token, raw)
    (record,) = meter.requests
    assert status == 200 and record.outcome == "completed"
    assert record.input_tokens_estimate == inspect(raw, gateway.input_margin).input_tokens_estimate
    # Lowered to what the budget covers: re-encoded (in the worker) with max_tokens lowered.
    assert record.input_tokens_estimate > 600_000 / 4
    assert record.max_tokens_forwarded == 700 and record.max_tokens_requested == 1024
    forwarded = sandbox.requests[-1].body
    assert forwarded is not None and forwarded["max_tokens"] == record.max_tokens_forwarded
    assert forwarded["messages"] == big["messages"]


async def test_a_parser_process_that_dies_fails_its_request_only(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    meter = _open(gateway, sandbox, budget="5")
    raw = json.dumps(_request("x" * (2 * OFF_LOOP))).encode()
    assert (await _post(gateway, meter.token, raw))[0] == 200  # the parsers are running
    parsers = [p.pid for p in processes() if p.ppid == os.getpid() and b"spawn_main" in p.cmdline]
    assert parsers
    for pid in parsers:
        os.kill(pid, signal.SIGKILL)
    status, headers, body = await _post(gateway, meter.token, raw)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "could not be parsed" in body["error"]["message"]
    assert headers["x-should-retry"] == "false"
    # New parser processes serve the next body.
    assert (await _post(gateway, meter.token, raw))[0] == 200
    assert [r.outcome for r in meter.requests] == ["completed", "invalid", "completed"]
    assert meter.reserved_usd == 0


# -- reads per session ---------------------------------------------------------------------------


async def test_a_session_has_two_bodies_read_at_once_then_waits_then_429(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    meter, other = _open(gateway, sandbox), _open(gateway, sandbox)
    slots = gateway.read_slots(meter.session_id)
    assert isinstance(slots, ReadSlots) and (slots.reads, slots.waiting_max) == (2, 8)
    body = json.dumps(_request()).encode()
    # Two slow bodies (half sent) hold the session's two reads.
    slow = [
        await RawRequest.send(gateway, meter.token, body[:10], declared=len(body)) for _ in "ab"
    ]
    await _until(lambda: slots.under_way == 2, "two bodies being read")
    # The third waits for a turn: the server holds it unread, unanswered.
    third = await RawRequest.send(gateway, meter.token, body)
    await _until(lambda: slots.waiting == 1, "the third waiting")
    assert slots.under_way == 2 and len(meter.requests) == 0
    # Another session is not held up by this one.
    status, _, _ = await _post(gateway, other.token, body)
    assert status == 200 and [r.outcome for r in other.requests] == ["completed"]
    # Seven more wait (eight in all); the next one is told to retry later.
    waiting = [await RawRequest.send(gateway, meter.token, body) for _ in range(7)]
    await _until(lambda: slots.waiting == 8, "eight waiting")
    status, headers, refusal = await _post(gateway, meter.token, body)
    assert status == 429 and refusal["error"]["type"] == "rate_limit_error"
    assert "2 being read, 8 waiting" in refusal["error"]["message"]
    assert headers["retry-after"] == "1" and headers["x-should-retry"] == "true"
    # The first slow body ends: the waiting ones get their turns, and answers, in order.
    await slow[0].finish(body[10:])
    assert (await slow[0].reply())[0] == 200
    assert (await third.reply())[0] == 200
    await slow[1].finish(body[10:])
    assert (await slow[1].reply())[0] == 200
    for request in waiting:
        assert (await request.reply())[0] == 200
    assert slots.under_way == 0 and slots.waiting == 0
    assert [r.outcome for r in meter.requests] == ["completed"] * 10  # the 429 is not one
    for request in [*slow, third, *waiting]:
        request.close()


async def test_a_client_that_goes_away_gives_its_turn_back(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    meter = _open(gateway, sandbox)
    slots = gateway.read_slots(meter.session_id)
    assert slots is not None
    body = json.dumps(_request()).encode()
    slow = [await RawRequest.send(gateway, meter.token, b"{", declared=len(body)) for _ in "ab"]
    waiter = await RawRequest.send(gateway, meter.token, body)
    await _until(lambda: slots.under_way == 2 and slots.waiting == 1, "two read, one waiting")
    for request in [*slow, waiter]:
        request.close()
    await _until(lambda: slots.under_way == 0 and slots.waiting == 0, "the turns given back")
    status, _, _ = await _post(gateway, meter.token, body)
    assert status == 200
    assert gateway.close_session(meter.session_id) is meter
    assert gateway.read_slots(meter.session_id) is None


# -- parsing off the event loop ------------------------------------------------------------------


async def test_large_bodies_are_parsed_in_a_worker_process_that_is_replaced_if_it_dies() -> None:
    parser = BodyParser(workers=1, off_loop_bytes=100)
    try:
        assert await parser.run(100, os.getpid) == os.getpid()  # small: inline
        worker = await parser.run(101, os.getpid)
        assert worker != os.getpid()
        # at a lower priority than the server (niceness is capped at 19)
        assert await parser.run(101, os.nice, 0) == min(19, os.nice(0) + 10)
        raw = json.dumps(_with_blocks(_document(pdf(2)))).encode()
        assert await parser.run(len(raw), inspect, raw, 0.2) == inspect(raw, 0.2)
        with pytest.raises(ParseFailed):
            await parser.run(101, os._exit, 3)
        replacement = await parser.run(101, os.getpid)
        assert replacement not in (worker, os.getpid())
    finally:
        parser.close()


def test_read_slots_checks_its_sizes() -> None:
    with pytest.raises(ValueError, match="reads must be >= 1"):
        ReadSlots(0, 1)
    with pytest.raises(ValueError, match="waiting >= 0"):
        ReadSlots(1, -1)
    with pytest.raises(ValueError, match="max_body_bytes must be >= 1"):
        MeteringGateway(PriceTable.load(), max_body_bytes=0)
