"""Money you can trust: budgets under concurrency, metered per request."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import grpc
import pytest
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.v1 import budget_pb2, session_pb2
from harness import MODEL, Harness, error_details, start_harness, stop_harness
from test_gateway import pdf

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
async def money(database_url: str) -> AsyncIterator[Harness]:
    h = await start_harness(database_url, max_sessions=64)
    h.sandbox.add_script(
        "hold",
        Script(
            steps=[
                Step(text="done", delay_s=2.0, usage=Usage(input_tokens=1000, output_tokens=100)),
            ]
        ),
    )
    yield h
    await stop_harness(h)


AUTH = Harness.auth("ten")


async def window(h: Harness) -> budget_pb2.Budget:
    return await h.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=AUTH)


async def attempt(h: Harness) -> session_pb2.Session | grpc.aio.AioRpcError:
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:hold]] go", model=MODEL), metadata=AUTH
    )
    try:
        events = [e async for e in call]
    except grpc.aio.AioRpcError as exc:
        return exc
    return events[-1].result.session


async def test_fifty_concurrent_sessions_against_a_limit_that_admits_ten(money: Harness) -> None:
    outcomes = await asyncio.gather(*(attempt(money) for _ in range(50)))

    admitted = [o for o in outcomes if isinstance(o, session_pb2.Session)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(admitted) == 10 and len(refused) == 40
    assert all(s.state == session_pb2.SESSION_STATE_COMPLETE for s in admitted)
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(err)["ErrorInfo"].reason == "BUDGET_EXCEEDED"
    b = await window(money)
    assert Decimal(b.reserved_usd) == 0
    assert Decimal(b.spent_usd) == sum(Decimal(s.cost_usd) for s in admitted)
    # Metered: the sandbox's usage numbers times the price table (sonnet: $3 / $15 per Mtok).
    assert all(Decimal(s.cost_usd) == Decimal("0.004500") for s in admitted)


async def test_a_session_stops_when_its_budget_is_used_up(money: Harness) -> None:
    turn = Step(
        tool_calls=[ToolCall("Glob", {"pattern": "*"})],
        usage=Usage(input_tokens=1000, output_tokens=1500),
    )
    money.sandbox.add_script("spender", Script(steps=[turn] * 15))
    before = len(money.sandbox.requests)
    call = money.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:spender]] spend", model=MODEL, max_budget_usd="0.05"
        ),
        metadata=AUTH,
    )
    final = [e async for e in call][-1].result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_BUDGET_EXCEEDED
    assert Decimal(final.cost_usd) <= Decimal("0.05")
    forwarded = [r for r in money.sandbox.requests[before:] if r.kind == "conversation"]
    assert forwarded and all(r.body["max_tokens"] < 32000 for r in forwarded)
    assert forwarded[-1].body["max_tokens"] < forwarded[0].body["max_tokens"]
    assert (
        json.dumps(forwarded[-1].headers).find("sk-ant-test-acme-key") >= 0
    )  # upstream got the key


async def test_a_pdf_the_budget_cannot_cover_is_never_forwarded(money: Harness) -> None:
    # 30 pages in 3 KB: by its size ~1,000 tokens, by its pages (what the API bills) ~180,000.
    (money.workspace / "report.pdf").write_bytes(pdf(30))
    (money.workspace / "report.txt").write_text("The report says PAPAYA.\n" * 100)
    for name in ("pdf", "txt"):
        money.sandbox.add_script(
            f"read-{name}",
            Script(
                steps=[
                    Step(
                        tool_calls=[ToolCall("Read", {"file_path": f"report.{name}"})],
                        usage=Usage(input_tokens=1000, output_tokens=50),
                    ),
                    Step(text="read", usage=Usage(input_tokens=1200, output_tokens=20)),
                ]
            ),
        )
    budget = "0.30"
    # The budget covers the conversation with the text file read ...
    events = await money.run("acme", prompt="[[sandbox:read-txt]] go", max_budget_usd=budget)
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE

    # ... but not with the PDF: the request that carries it is refused before forwarding.
    before = len(money.sandbox.requests)
    events = await money.run("acme", prompt="[[sandbox:read-pdf]] go", max_budget_usd=budget)
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_BUDGET_EXCEEDED
    assert Decimal(final.cost_usd) <= Decimal(budget)
    read = [e.tool_result for e in events if e.HasField("tool_result")]
    assert len(read) == 1 and not read[0].is_error  # the agent did read the PDF
    forwarded = [r for r in money.sandbox.requests[before:] if r.kind == "conversation"]
    assert len(forwarded) == 1  # the first turn only
    assert all('"document"' not in json.dumps(r.body) for r in money.sandbox.requests[before:])


async def test_racing_repeats_of_a_request_id_hold_the_budget_once(money: Harness) -> None:
    # Each repeat that loses the race takes its hold, fails to write its session (the
    # request_id is taken) and undoes the hold before it re-attaches: none is leaked.
    before = await window(money)
    request = session_pb2.RunSessionRequest(
        prompt="[[sandbox:hold]] go", model=MODEL, request_id=str(uuid.uuid4())
    )

    async def send() -> list[session_pb2.SessionEvent]:
        return [e async for e in money.sessions.RunSession(request, metadata=AUTH)]

    streams = await asyncio.gather(*(send() for _ in range(8)))
    assert len({s[0].session_id for s in streams}) == 1
    assert {s[-1].result.session.state for s in streams} == {session_pb2.SESSION_STATE_COMPLETE}
    after = await window(money)
    assert Decimal(after.reserved_usd) == 0
    assert Decimal(after.spent_usd) - Decimal(before.spent_usd) == Decimal("0.0045")
