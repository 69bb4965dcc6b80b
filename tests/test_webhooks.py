"""Signed webhooks from the durable outbox, against real receivers on loopback.

A receiver (tests/webhook_receiver.py) verifies every request with the Standard Webhooks
library and answers as each test planned; the server runs real sessions (the sandbox
model scripted), writes deliveries with their events and sends them in the background.
Tests wait on what the receiver got, or on a delivery's recorded state, never on a clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
import pytest
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.server.store.engine import create_engine, sessionmaker
from agentplane.server.store.models import WebhookDeliveryRow
from agentplane.server.tenants import hash_token
from agentplane.v1 import session_pb2, session_pb2_grpc, webhook_pb2, webhook_pb2_grpc
from google.protobuf import json_format
from harness import MODEL, Harness, error_details, start_harness, stop_harness
from replicas_harness import Replica, Replicas, start_replicas
from sqlalchemy import select, text
from webhook_receiver import Received, WebhookReceiver, dead_port, new_secret

pytestmark = pytest.mark.asyncio

SECRET_ENV = "AGENTPLANE_TEST_WEBHOOK_SECRET"
TOKENS = {"hooks": "hooks-token-1", "brief": "brief-token-2", "thrifty": "thrifty-token-3"}
# A caller tool for session.waiting.
LOOKUP = session_pb2.CallerTool(name="lookup", description="Look a word up.")


def tenants(receiver: WebhookReceiver, dead: int) -> str:
    """hooks: an endpoint for session events, callbacks under /cb/, quick retries for two
    minutes; brief: callbacks only, retried for two seconds; thrifty: a budget endpoint
    told when the day reaches half its limit."""
    base = receiver.base
    key = 'anthropic_api_key_env = "AGENTPLANE_TEST_ACME_KEY"'
    return f"""
[tenants.hooks]
token_sha256 = ["{hash_token(TOKENS["hooks"])}"]
{key}
allowed_tools = ["Read"]

[tenants.hooks.webhooks]
secret_env = "{SECRET_ENV}"
callback_urls = ["{base}/cb/"]
first_retry_s = 0.1
max_retry_delay_s = 0.5
retry_s = 120

[tenants.hooks.webhooks.endpoints.main]
url = "{base}/main"
events = ["session.ended", "session.waiting"]

[tenants.brief]
token_sha256 = ["{hash_token(TOKENS["brief"])}"]
{key}
allowed_tools = ["Read"]

[tenants.brief.webhooks]
secret_env = "{SECRET_ENV}"
callback_urls = ["http://127.0.0.1:{dead}/", "{base}/redirect"]
first_retry_s = 0.2
max_retry_delay_s = 0.5
retry_s = 2

[tenants.thrifty]
token_sha256 = ["{hash_token(TOKENS["thrifty"])}"]
{key}
allowed_tools = ["Read"]
daily_limit_usd = 1.0
max_session_budget_usd = 0.35

[tenants.thrifty.webhooks]
secret_env = "{SECRET_ENV}"
budget_threshold = 0.5

[tenants.thrifty.webhooks.endpoints.budget]
url = "{base}/budget"
events = ["budget.threshold"]
"""


@dataclass
class Hooks:
    harness: Harness
    receiver: WebhookReceiver
    secret: str
    dead: int
    webhooks: webhook_pb2_grpc.WebhookServiceStub


@pytest.fixture(scope="module")
async def hooks(database_url: str) -> AsyncIterator[Hooks]:
    secret = new_secret()
    os.environ[SECRET_ENV] = secret
    receiver = WebhookReceiver(secret)
    await receiver.start()
    dead = dead_port()
    h = await start_harness(database_url, extra_tenants=tenants(receiver, dead))
    yield Hooks(h, receiver, secret, dead, webhook_pb2_grpc.WebhookServiceStub(h.channel))
    await stop_harness(h)
    await receiver.stop()


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


async def run(h: Hooks, tenant: str, **fields: Any) -> session_pb2.Session:
    """RunSession to its end; the final Session."""
    fields.setdefault("model", MODEL)
    fields.setdefault("prompt", "hello")
    call = h.harness.sessions.RunSession(
        session_pb2.RunSessionRequest(**fields), metadata=auth(tenant)
    )
    events = [event async for event in call]
    assert events[-1].HasField("result"), events[-1]
    return events[-1].result.session


async def deliveries(h: Hooks, tenant: str, **flt: Any) -> list[webhook_pb2.WebhookDelivery]:
    reply = await h.webhooks.ListWebhookDeliveries(
        webhook_pb2.ListWebhookDeliveriesRequest(**flt), metadata=auth(tenant)
    )
    return list(reply.deliveries)


async def settled(
    h: Hooks, tenant: str, done: Callable[[list[webhook_pb2.WebhookDelivery]], bool], **flt: Any
) -> list[webhook_pb2.WebhookDelivery]:
    """The deliveries once `done` holds of them: each read is one RPC, repeated until
    the sender recorded what the test waits for (a safety cap stops a broken test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        found = await deliveries(h, tenant, **flt)
        if done(found) or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


def about(session_id: str, path: str) -> Callable[[Received], bool]:
    def match(r: Received) -> bool:
        return r.path == path and r.verified and session_of(r.payload) == session_id

    return match


def session_of(payload: Any) -> str:
    data = payload.get("data", {}) if isinstance(payload, dict) else {}
    return str(data.get("session", {}).get("id") or data.get("sessionId") or "")


async def test_a_session_end_is_delivered_once_signed_with_the_final_session(
    hooks: Hooks,
) -> None:
    final = await run(hooks, "hooks", labels={"job": "nightly"})

    got = await hooks.receiver.wait(about(final.id, "/main"))
    request = got[0]
    assert request.verified  # the Standard Webhooks library checked the signature
    assert request.headers["webhook-id"].startswith("msg_")
    assert request.headers["content-type"] == "application/json"
    payload = request.payload
    assert payload["type"] == "session.ended"
    # The final Session, in the proto's JSON mapping: it parses back to what the stream
    # ended with.
    parsed = json_format.ParseDict(payload["data"]["session"], session_pb2.Session())
    assert parsed == final
    assert payload["data"]["session"]["state"] == "SESSION_STATE_COMPLETE"

    listed = await settled(
        hooks,
        "hooks",
        lambda ds: bool(ds) and ds[0].state == webhook_pb2.DELIVERY_STATE_DELIVERED,
        session_id=final.id,
    )
    assert [(d.id, d.event, d.endpoint) for d in listed] == [
        (request.webhook_id, "session.ended", "main")
    ]
    assert [(a.number, a.http_status, a.error) for a in listed[0].attempts] == [(1, 200, "")]
    assert listed[0].HasField("end_time")
    # Delivered once: nothing else came for it.
    assert len(hooks.receiver.matching(about(final.id, "/main"))) == 1


async def test_a_receiver_failing_twice_gets_the_same_webhook_three_times(hooks: Hooks) -> None:
    path = f"/cb/flaky-{uuid.uuid4().hex[:8]}"
    hooks.receiver.plan(path, [500, 500])

    final = await run(hooks, "hooks", callback_url=hooks.receiver.base + path)

    got = await hooks.receiver.wait(about(final.id, path), count=3)
    assert [r.status for r in got] == [500, 500, 200]
    assert len({r.webhook_id for r in got}) == 1  # one id: the receiver drops repeats
    assert all(r.payload["type"] == "session.ended" for r in got)
    listed = await settled(
        hooks,
        "hooks",
        lambda ds: any(
            d.endpoint == "callback" and d.state == webhook_pb2.DELIVERY_STATE_DELIVERED for d in ds
        ),
        session_id=final.id,
    )
    callback = next(d for d in listed if d.endpoint == "callback")
    assert callback.id == got[0].webhook_id
    assert callback.url == hooks.receiver.base + path
    assert [(a.number, a.http_status) for a in callback.attempts] == [(1, 500), (2, 500), (3, 200)]
    assert [a.error for a in callback.attempts] == ["HTTP 500", "HTTP 500", ""]
    # The tenant's endpoint got its own delivery of the same event, once.
    main = next(d for d in listed if d.endpoint == "main")
    assert main.id != callback.id
    assert final.callback_url == hooks.receiver.base + path


async def test_a_receiver_down_for_the_whole_retry_window_leaves_a_failed_delivery(
    hooks: Hooks,
) -> None:
    url = f"http://127.0.0.1:{hooks.dead}/hook"

    final = await run(hooks, "brief", callback_url=url)

    assert final.state == session_pb2.SESSION_STATE_COMPLETE  # the receiver never held it
    listed = await settled(
        hooks,
        "brief",
        lambda ds: bool(ds) and ds[0].state == webhook_pb2.DELIVERY_STATE_FAILED,
        session_id=final.id,
    )
    (failed,) = listed
    assert failed.state == webhook_pb2.DELIVERY_STATE_FAILED
    assert failed.url == url and failed.HasField("end_time")
    assert len(failed.attempts) >= 2  # retried within the window, then given up
    assert all(a.http_status == 0 and "cannot connect" in a.error for a in failed.attempts)
    assert failed.attempts[-1].start_time.ToDatetime() <= failed.deadline.ToDatetime()


async def test_a_redirect_is_not_followed(hooks: Hooks) -> None:
    final = await run(hooks, "brief", callback_url=hooks.receiver.base + "/redirect")

    listed = await settled(
        hooks,
        "brief",
        lambda ds: bool(ds) and ds[0].state == webhook_pb2.DELIVERY_STATE_FAILED,
        session_id=final.id,
    )
    (failed,) = listed
    assert failed.attempts and all(a.http_status == 302 for a in failed.attempts)
    assert "not followed" in failed.attempts[0].error
    asked = hooks.receiver.matching(lambda r: r.path == "/redirect")
    assert len(asked) == len(failed.attempts)
    assert hooks.receiver.matching(lambda r: r.path == "/target") == []


@pytest.mark.parametrize(
    ("tenant", "url"),
    [
        ("hooks", "http://127.0.0.1:{port}/elsewhere"),  # another path
        ("hooks", "http://127.0.0.1:{port}/cbx/1"),  # a prefix of the name, not below /cb/
        ("hooks", "http://127.0.0.1:{port}/cb/../admin"),  # climbing out
        ("hooks", "http://127.0.0.1:{port}/cb/%2e%2e/admin"),  # climbing out, encoded
        ("hooks", "https://127.0.0.1:{port}/cb/x"),  # another scheme
        ("hooks", "http://localhost:{port}/cb/x"),  # another host name
        ("hooks", "http://user:pw@127.0.0.1:{port}/cb/x"),  # user info
        ("hooks", "not a url"),
        ("thrifty", "http://127.0.0.1:{port}/cb/x"),  # a tenant with no callback URLs
    ],
)
async def test_a_callback_url_outside_the_tenants_list_is_invalid_argument(
    hooks: Hooks, tenant: str, url: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(hooks, tenant, callback_url=url.format(port=hooks.receiver.port))

    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(err)
    assert details["ErrorInfo"].reason == "CALLBACK_URL_NOT_ALLOWED"
    assert [v.field for v in details["BadRequest"].field_violations] == ["callback_url"]
    assert "callback" in (err.details() or "")


async def test_a_session_waiting_for_its_caller_is_announced_with_its_request(
    hooks: Hooks,
) -> None:
    hooks.harness.sandbox.add_script(
        "hook_lookup",
        Script(steps=[Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "x"})]), Step("ok")]),
    )
    call = hooks.harness.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:hook_lookup]] go", model=MODEL, tools=[LOOKUP]
        ),
        metadata=auth("hooks"),
    )
    first = await call.read()
    session_id = first.session_id

    # A backend that holds no stream learns of the request from the webhook alone, and
    # answers it with what the webhook carries.
    (got,) = await hooks.receiver.wait(
        lambda r: (
            r.path == "/main"
            and r.verified
            and r.payload["type"] == "session.waiting"
            and session_of(r.payload) == session_id
        )
    )
    asked = got.payload["data"]["inputRequest"]
    assert asked["kind"] == "INPUT_KIND_TOOL_CALL" and asked["toolName"] == "lookup"
    await hooks.harness.sessions.Respond(
        session_pb2.RespondRequest(
            session_id=session_id,
            request_id=asked["requestId"],
            tool_result=session_pb2.ToolCallResult(text="found"),
        ),
        metadata=auth("hooks"),
    )
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    ended = await hooks.receiver.wait(about(session_id, "/main"), count=2)
    assert [r.payload["type"] for r in ended] == ["session.waiting", "session.ended"]


async def test_the_days_threshold_fires_once_per_day(hooks: Hooks) -> None:
    # Each session costs about 0.30 USD of the day's 1.00: the second takes the day past
    # its half, the third stays past it.
    hooks.harness.sandbox.add_script(
        "costly", Script(steps=[Step("spent", usage=Usage(input_tokens=100_000, output_tokens=10))])
    )

    def threshold(ds: list[webhook_pb2.WebhookDelivery]) -> list[webhook_pb2.WebhookDelivery]:
        return [d for d in ds if d.event == "budget.threshold"]

    await run(hooks, "thrifty", prompt="[[sandbox:costly]] go")
    assert threshold(await deliveries(hooks, "thrifty")) == []  # 0.30 of 1.00: under half

    second = await run(hooks, "thrifty", prompt="[[sandbox:costly]] go")
    assert len(threshold(await deliveries(hooks, "thrifty"))) == 1  # written with its end
    third = await run(hooks, "thrifty", prompt="[[sandbox:costly]] go")
    assert Decimal(third.cost_usd) > 0

    (fired,) = threshold(await deliveries(hooks, "thrifty", event="budget.threshold"))
    assert fired.endpoint == "budget" and fired.session_id == ""
    (got,) = await hooks.receiver.wait(lambda r: r.path == "/budget" and r.verified)
    assert got.webhook_id == fired.id
    budget = got.payload["data"]["budget"]
    assert got.payload["type"] == "budget.threshold"
    assert got.payload["data"]["threshold"] == "0.5"
    assert budget["tenant"] == "thrifty" and budget["limitUsd"] == "1.000000"
    assert Decimal("0.5") <= Decimal(budget["spentUsd"]) < Decimal(budget["limitUsd"])
    assert Decimal(budget["spentUsd"]) >= Decimal(second.cost_usd)
    await settled(
        hooks,
        "thrifty",
        lambda ds: all(d.state == webhook_pb2.DELIVERY_STATE_DELIVERED for d in ds),
    )
    assert len(hooks.receiver.matching(lambda r: r.path == "/budget")) == 1


async def test_deliveries_are_listed_per_tenant_and_bad_filters_are_refused(
    hooks: Hooks,
) -> None:
    final = await run(hooks, "hooks")
    await hooks.receiver.wait(about(final.id, "/main"))
    mine = await deliveries(hooks, "hooks", session_id=final.id)
    assert [d.session_id for d in mine] == [final.id]
    # Another tenant never sees them.
    assert await deliveries(hooks, "thrifty", session_id=final.id) == []
    # Pages: one at a time, the token bound to its filters.
    first = await hooks.webhooks.ListWebhookDeliveries(
        webhook_pb2.ListWebhookDeliveriesRequest(page_size=1), metadata=auth("hooks")
    )
    assert len(first.deliveries) == 1 and first.next_page_token
    second = await hooks.webhooks.ListWebhookDeliveries(
        webhook_pb2.ListWebhookDeliveriesRequest(page_size=1, page_token=first.next_page_token),
        metadata=auth("hooks"),
    )
    assert second.deliveries[0].id != first.deliveries[0].id

    for request, field in [
        (webhook_pb2.ListWebhookDeliveriesRequest(page_size=-1), "page_size"),
        (webhook_pb2.ListWebhookDeliveriesRequest(state=99), "state"),  # type: ignore[arg-type]
        (webhook_pb2.ListWebhookDeliveriesRequest(event="session.exploded"), "event"),
        (webhook_pb2.ListWebhookDeliveriesRequest(page_token="garbage"), "page_token"),
        (
            webhook_pb2.ListWebhookDeliveriesRequest(
                page_token=first.next_page_token, event="session.ended"
            ),
            "page_token",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hooks.webhooks.ListWebhookDeliveries(request, metadata=auth("hooks"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        violations = error_details(caught.value)["BadRequest"].field_violations
        assert [v.field for v in violations] == [field]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hooks.webhooks.ListWebhookDeliveries(webhook_pb2.ListWebhookDeliveriesRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_signing_secret_is_in_no_log_row_or_error(
    hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = f"/cb/log-{uuid.uuid4().hex[:8]}"
    hooks.receiver.plan(path, [503])
    final = await run(hooks, "hooks", callback_url=hooks.receiver.base + path)
    await hooks.receiver.wait(about(final.id, path), count=2)
    await settled(
        hooks,
        "hooks",
        lambda ds: all(d.state == webhook_pb2.DELIVERY_STATE_DELIVERED for d in ds),
        session_id=final.id,
    )
    key = hooks.secret.removeprefix("whsec_")
    logged = "\n".join(
        f"{record.getMessage()} {json.dumps(vars(record), default=str)}"
        for record in caplog.records
    )
    assert "webhook_retrying" in logged and "webhook_delivered" in logged
    assert key not in logged

    # Every text of the tables a tenant's data lands in.
    async with sessionmaker(hooks.harness.app.engine)() as db:
        for table in ("webhook_deliveries", "webhook_attempts", "sessions", "session_events"):
            rows = (await db.execute(text(f"SELECT * FROM {table}"))).all()
            assert rows, table
            assert key not in repr(rows), table
    # Nor do the requests themselves carry it: only its signature.
    for r in hooks.receiver.received:
        assert key not in r.body.decode() and key not in json.dumps(r.headers)


@pytest.mark.slow
async def test_a_replica_killed_while_sending_leaves_the_delivery_to_another() -> None:
    secret = new_secret()
    receiver = WebhookReceiver(secret)
    await receiver.start()
    release = receiver.hold("/held")
    hooks_tenant = f"""
[tenants.hooks]
token_sha256 = ["{hash_token(TOKENS["hooks"])}"]
anthropic_api_key_env = "AGENTPLANE_TEST_ACME_KEY"
allowed_tools = ["Read"]

[tenants.hooks.webhooks]
secret_env = "{SECRET_ENV}"
first_retry_s = 0.1
max_retry_delay_s = 0.5
retry_s = 300

[tenants.hooks.webhooks.endpoints.main]
url = "{receiver.base}/held"
events = ["session.ended"]
"""
    try:
        async with start_replicas(
            2,
            extra_tenants=hooks_tenant,
            AGENTPLANE_WEBHOOK_TIMEOUT_S="5",
            **{SECRET_ENV: secret},
        ) as fleet:
            stub = session_pb2_grpc.SessionServiceStub(fleet[0].channel)
            call = stub.RunSession(
                session_pb2.RunSessionRequest(prompt="hello", model=MODEL), metadata=auth("hooks")
            )
            events = [e async for e in call]
            session_id = events[-1].result.session.id

            # The session ended; one replica claimed its webhook and is sending it: the
            # receiver holds that request. Kill -9 that replica, mid-send.
            (first,) = await receiver.wait(about(session_id, "/held"))
            sender = await claimant(fleet, first.webhook_id)
            survivor = next(r for r in fleet.replicas if r is not sender)
            sender.kill()
            await sender.wait()
            release.set()

            # Its claim expires; the other replica sends it again, under the same id.
            got = await receiver.wait(about(session_id, "/held"), count=2)
            assert [r.webhook_id for r in got] == [first.webhook_id] * 2
            stub = webhook_pb2_grpc.WebhookServiceStub(survivor.channel)
            for _ in range(2400):
                reply = await stub.ListWebhookDeliveries(
                    webhook_pb2.ListWebhookDeliveriesRequest(session_id=session_id),
                    metadata=auth("hooks"),
                )
                if reply.deliveries[0].state == webhook_pb2.DELIVERY_STATE_DELIVERED:
                    break
                await asyncio.sleep(0.05)
            (delivery,) = reply.deliveries
            assert delivery.state == webhook_pb2.DELIVERY_STATE_DELIVERED
            # The killed replica never recorded its attempt; the survivor's is the one.
            assert [(a.number, a.http_status) for a in delivery.attempts] == [(1, 200)]
    finally:
        await receiver.stop()


async def claimant(fleet: Replicas, delivery_id: str) -> Replica:
    """The replica whose claim a delivery holds (its sender logs its owner id at start)."""
    engine = create_engine(fleet.database_url)
    try:
        async with sessionmaker(engine)() as db:
            owner = await db.scalar(
                select(WebhookDeliveryRow.claimed_by).where(WebhookDeliveryRow.id == delivery_id)
            )
    finally:
        await engine.dispose()
    assert owner, "the delivery is not claimed"
    (replica,) = [r for r in fleet.replicas if any(owner in line for line in r.log_lines())]
    return replica
