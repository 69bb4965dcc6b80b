"""Pending records of model requests: the gateway writes one before it forwards a request
(a burst in one commit), refuses a request whose record cannot be written, and the
request's settlement replaces its record; on a real database."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from agentplane.server.domain import Session, SessionState, utcnow
from agentplane.server.gateway.meter import MeteredRequest, SessionMeter
from agentplane.server.gateway.proxy import MeteringGateway
from agentplane.server.model_double import SandboxServer
from agentplane.server.money.in_flight import NotRecorded, PendingWriter
from agentplane.server.money.pricing import PriceTable
from agentplane.server.store import model_requests
from agentplane.server.store import sessions as repo
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from agentplane.server.store.models import ModelRequestInFlightRow, ModelRequestRow
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

pytestmark = pytest.mark.asyncio

PRICES = PriceTable.load()
MODEL = "claude-sonnet-4-5"


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await migrate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def db(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return sessionmaker(engine)


async def new_session(db: async_sessionmaker[AsyncSession]) -> str:
    session = Session(
        id=str(uuid.uuid4()),
        tenant="acme",
        state=SessionState.RUNNING,
        create_time=utcnow(),
        max_budget_usd=Decimal(1),
        max_turns=3,
        allowed_tools=("Read",),
    )
    async with db.begin() as s:
        await repo.insert_session(s, session, request_hash="h", budget_day="2026-12-07")
    return session.id


def rec(writer: PendingWriter, session_id: str, r: MeteredRequest) -> Awaitable[None]:
    """Write `r`'s pending record, as the gateway does."""
    return writer.record(r.request_id, session_id, r.model, r.reserved_usd, r.started_at)


def request(estimate: str = "0.25") -> MeteredRequest:
    return MeteredRequest(model=MODEL, reserved_usd=Decimal(estimate))


async def pending_rows(
    db: async_sessionmaker[AsyncSession], session_id: str
) -> list[ModelRequestInFlightRow]:
    async with db() as s:
        rows = await s.scalars(
            select(ModelRequestInFlightRow).where(ModelRequestInFlightRow.session_id == session_id)
        )
        return list(rows)


async def test_a_burst_of_records_is_one_commit(
    engine: AsyncEngine, db: async_sessionmaker[AsyncSession]
) -> None:
    session_id = await new_session(db)
    writer = PendingWriter(db, "replica-a")
    commits = 0

    def committed(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    burst = [request(f"0.0{i}") for i in range(1, 10)] + [request("0.5") for _ in range(11)]
    event.listen(engine.sync_engine, "commit", committed)
    try:
        await asyncio.gather(*(rec(writer, session_id, r) for r in burst))
    finally:
        event.remove(engine.sync_engine, "commit", committed)
    assert commits == 1
    rows = {r.request_id: r for r in await pending_rows(db, session_id)}
    assert sorted(rows) == sorted(r.request_id for r in burst)
    assert all(rows[r.request_id].estimate_usd == r.reserved_usd for r in burst)
    assert {(r.replica, r.model) for r in rows.values()} == {("replica-a", MODEL)}


async def test_a_failed_write_refuses_its_whole_batch_and_the_next_one_is_written(
    db: async_sessionmaker[AsyncSession],
) -> None:
    session_id = await new_session(db)
    writer = PendingWriter(db, "replica-a")
    good, twin = request(), request()
    # One transaction for a burst: a record that breaks it (here its session does not
    # exist) refuses every request of the burst, none of which is written.
    outcomes = await asyncio.gather(
        rec(writer, session_id, good),
        rec(writer, "no-such-session", twin),
        return_exceptions=True,
    )
    assert [type(o) for o in outcomes] == [NotRecorded, NotRecorded]
    assert "IntegrityError" in str(outcomes[0])
    assert await pending_rows(db, session_id) == []
    await rec(writer, session_id, good)
    assert [r.request_id for r in await pending_rows(db, session_id)] == [good.request_id]


async def test_settling_replaces_the_pending_record_in_one_transaction(
    db: async_sessionmaker[AsyncSession],
) -> None:
    session_id = await new_session(db)
    writer = PendingWriter(db, "replica-a")
    held, done = request(), request()
    for r in (held, done):
        await rec(writer, session_id, r)
    settled = model_requests.ModelRequestRecord(
        session_id=session_id,
        tenant="acme",
        started_at=done.started_at,
        ended_at=utcnow(),
        model=MODEL,
        outcome="completed",
        status=200,
        usage=done.usage,
        cost_usd=Decimal("0.01"),
        request_id=done.request_id,
    )
    async with db.begin() as s:
        await model_requests.settle_records(s, [settled])
    assert [r.request_id for r in await pending_rows(db, session_id)] == [held.request_id]
    async with db() as s:
        (row,) = await s.scalars(
            select(ModelRequestRow).where(ModelRequestRow.session_id == session_id)
        )
    assert (row.outcome, row.cost_usd) == ("completed", Decimal("0.01"))


# -- through the gateway ------------------------------------------------------------------


async def post(gateway: MeteringGateway, meter: SessionMeter) -> tuple[int, dict[str, str]]:
    body = {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hello"}],
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.base_url + "/v1/messages",
            data=json.dumps(body).encode(),
            headers={"x-api-key": meter.token, "anthropic-version": "2023-06-01"},
        ) as resp,
    ):
        await resp.read()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}


@pytest.fixture
async def gateway(db: async_sessionmaker[AsyncSession]) -> AsyncIterator[MeteringGateway]:
    async with MeteringGateway(PRICES) as gw:
        gw.in_flight = PendingWriter(db, "replica-a")
        yield gw


def open_meter(gateway: MeteringGateway, sandbox: SandboxServer, session_id: str) -> SessionMeter:
    meter = gateway.open_session(
        session_id,
        budget_usd=Decimal(1),
        upstream_base_url=sandbox.base_url,
        upstream_api_key="sk-ant-test-key",
    )
    meter.on_request = lambda _request: None  # a running session's: its requests recorded
    return meter


async def test_the_gateway_records_a_request_before_it_forwards_it(
    db: async_sessionmaker[AsyncSession], gateway: MeteringGateway
) -> None:
    session_id = await new_session(db)
    async with SandboxServer() as sandbox:
        meter = open_meter(gateway, sandbox, session_id)
        status, _ = await post(gateway, meter)
        assert status == 200 and len(sandbox.requests) == 1
    (sent,) = meter.requests
    # Nothing settled it in the database here (a session's recorder would): it is left.
    (row,) = await pending_rows(db, session_id)
    assert (row.request_id, row.estimate_usd) == (sent.request_id, sent.reserved_usd)
    assert sent.reserved_usd > sent.cost_usd > 0


async def test_a_request_whose_record_cannot_be_written_is_refused_never_forwarded(
    gateway: MeteringGateway,
) -> None:
    async with SandboxServer() as sandbox:
        # Its session row does not exist: the record's write fails.
        meter = open_meter(gateway, sandbox, "no-such-session")
        status, headers = await post(gateway, meter)
        assert sandbox.requests == []
    assert status == 503 and headers["x-should-retry"] == "true"
    (refused,) = meter.requests
    assert (refused.outcome, refused.cost_usd) == ("unrecorded", 0)
    assert meter.reserved_usd == 0 and meter.in_flight == 0


async def test_a_warm_agents_requests_are_not_recorded(
    db: async_sessionmaker[AsyncSession], gateway: MeteringGateway
) -> None:
    # Before its session runs, nothing records its settled requests: nor pending ones
    # (had the gateway tried, the write would have failed, no such session, and refused).
    async with SandboxServer() as sandbox:
        meter = open_meter(gateway, sandbox, "warm-agent-not-admitted")
        meter.on_request = None
        status, _ = await post(gateway, meter)
        assert status == 200 and len(sandbox.requests) == 1
