"""Sessions that pause at their budget instead of ending, and UpdateSessionBudget.

The sandbox model is scripted to need three requests (two tool turns and an answer) that
cost 0.0315 USD each; a budget of 0.07 USD covers two: the third is held at the gateway
and the session pauses. Tests wait on the session's events (its `paused` event, its end)
or on what the webhook receiver got, never on a clock.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
import pytest
from agentplane import AsyncClient
from agentplane.cli import main
from agentplane.server.domain import EventKind, Session, SessionState, utcnow
from agentplane.server.gateway.meter import SessionMeter
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.server.sessions.live import LiveSession
from agentplane.server.sessions.pauses import BudgetHub
from agentplane.server.sessions.run.ending import result_event
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from agentplane.server.tenants import hash_token
from agentplane.v1 import budget_pb2, budget_pb2_grpc, session_pb2, session_pb2_grpc
from harness import MODEL, Harness, error_details, start_harness, stop_harness
from replicas_harness import start_replicas
from webhook_receiver import WebhookReceiver, new_secret

pytestmark = pytest.mark.asyncio

SECRET_ENV = "AGENTPLANE_TEST_PAUSE_SECRET"
TOKENS = {"pauser": "pauser-token-1", "tight": "tight-token-2", "brief": "brief-token-3"}
# Each request: 10,000 input tokens at 3 USD/Mtok and 100 output at 15: 0.0315 USD.
TURN = Step(
    tool_calls=[ToolCall("Glob", {"pattern": "*"})],
    usage=Usage(input_tokens=10_000, output_tokens=100),
)
ANSWER = Step(text="all done", usage=Usage(input_tokens=10_000, output_tokens=100))
THREE = Script(steps=[TURN, TURN, ANSWER])
PER_REQUEST = Decimal("0.031500")
# Covers two requests and not the third's reservation.
TWO = "0.07"


def tenants(receiver_base: str = "") -> str:
    """pauser: pauses at its budget, a session.paused endpoint; tight: pauses, a day of 0.2
    USD (two sessions of 0.07 leave too little for a raise to 0.15); brief: pauses for at
    most a second."""
    hooks = (
        f"""
[tenants.pauser.webhooks]
secret_env = "{SECRET_ENV}"
callback_urls = ["{receiver_base}/cb/"]

[tenants.pauser.webhooks.endpoints.paused]
url = "{receiver_base}/paused"
events = ["session.paused"]
"""
        if receiver_base
        else ""
    )
    common = 'anthropic_api_key_env = "AGENTPLANE_TEST_ACME_KEY"\nallowed_tools = ["Glob"]\n'
    return f"""
[tenants.pauser]
token_sha256 = ["{hash_token(TOKENS["pauser"])}"]
{common}on_budget_exhausted = "PAUSE"
max_session_budget_usd = 1
daily_limit_usd = 50
{hooks}
[tenants.tight]
token_sha256 = ["{hash_token(TOKENS["tight"])}"]
{common}on_budget_exhausted = "PAUSE"
max_session_budget_usd = 0.15
daily_limit_usd = 0.2

[tenants.brief]
token_sha256 = ["{hash_token(TOKENS["brief"])}"]
{common}on_budget_exhausted = "PAUSE"
max_pause_s = 1
"""


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@dataclass
class Paused:
    """A session started and followed until its `paused` event."""

    call: Any
    session_id: str
    events: list[session_pb2.SessionEvent]

    async def finish(self) -> session_pb2.Session:
        async for event in self.call:
            self.events.append(event)
        return self.events[-1].result.session


async def until_paused(
    sessions: session_pb2_grpc.SessionServiceStub,
    tenant: str,
    *,
    token: str = "",
    **fields: Any,
) -> Paused:
    """A session of `tenant` (its token here, or `token`) run until its `paused` event."""
    fields.setdefault("model", MODEL)
    fields.setdefault("prompt", "[[sandbox:three]] go")
    fields.setdefault("max_budget_usd", TWO)
    metadata = (("authorization", f"Bearer {token}"),) if token else auth(tenant)
    call = sessions.RunSession(session_pb2.RunSessionRequest(**fields), metadata=metadata)
    events: list[session_pb2.SessionEvent] = []
    async for event in call:
        events.append(event)
        if event.HasField("paused") or event.HasField("result"):
            break
    assert events[-1].HasField("paused"), events[-1]
    return Paused(call, events[0].session_id, events)


async def raise_to(
    sessions: session_pb2_grpc.SessionServiceStub, tenant: str, session_id: str, amount: str
) -> session_pb2.Session:
    return await sessions.UpdateSessionBudget(
        session_pb2.UpdateSessionBudgetRequest(session_id=session_id, max_budget_usd=amount),
        metadata=auth(tenant),
    )


async def until(
    sessions: session_pb2_grpc.SessionServiceStub,
    tenant: str,
    session_id: str,
    done: Callable[[session_pb2.Session], bool],
) -> session_pb2.Session:
    """GetSession until `done` holds of the session (a safety cap stops a broken test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        session = await sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=session_id), metadata=auth(tenant)
        )
        if done(session) or loop.time() > deadline:
            return session
        await asyncio.sleep(0.05)


@dataclass
class Setup:
    harness: Harness
    receiver: WebhookReceiver


@pytest.fixture(scope="module")
async def setup(database_url: str) -> AsyncIterator[Setup]:
    secret = new_secret()
    os.environ[SECRET_ENV] = secret
    receiver = WebhookReceiver(secret)
    await receiver.start()
    h = await start_harness(database_url, extra_tenants=tenants(receiver.base))
    h.sandbox.add_script("three", THREE)
    yield Setup(h, receiver)
    await stop_harness(h)
    await receiver.stop()


async def reserved(h: Harness, tenant: str) -> Decimal:
    reply = await h.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=auth(tenant))
    return Decimal(reply.reserved_usd)


async def test_a_paused_session_goes_on_when_its_budget_is_raised(setup: Setup) -> None:
    h = setup.harness
    before = len(h.sandbox.find(script="three"))
    paused = await until_paused(h.sessions, "pauser")
    sid = paused.session_id
    event = paused.events[-1].paused
    assert event.pause.reason == session_pb2.PAUSE_REASON_SESSION_BUDGET
    assert event.max_budget_usd == "0.070000" and Decimal(event.cost_usd) == 2 * PER_REQUEST

    # Seen as paused in GetSession and ListSessions' filter, and told by a signed webhook.
    session = await h.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=sid), metadata=auth("pauser")
    )
    assert session.state == session_pb2.SESSION_STATE_RUNNING and session.HasField("paused")
    assert session.paused.deadline.ToDatetime() > session.paused.since.ToDatetime()
    listed = await h.sessions.ListSessions(
        session_pb2.ListSessionsRequest(paused=True), metadata=auth("pauser")
    )
    assert [s.id for s in listed.sessions] == [sid]
    (hook,) = await setup.receiver.wait(lambda r: r.path == "/paused" and r.verified)
    assert hook.payload["type"] == "session.paused"
    assert hook.payload["data"]["session"]["id"] == sid
    assert hook.payload["data"]["session"]["paused"]["reason"] == "PAUSE_REASON_SESSION_BUDGET"
    # The third request waits at the gateway: the model has seen two.
    assert len(h.sandbox.find(script="three")) - before == 2

    raised = await raise_to(h.sessions, "pauser", sid, "0.2")
    assert raised.max_budget_usd == "0.200000"
    final = await paused.finish()

    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert final.result == "all done" and not final.HasField("paused")
    assert final.max_budget_usd == "0.200000"
    # What it cost is what the model billed: three requests, nothing more.
    assert len(h.sandbox.find(script="three")) - before == 3
    assert Decimal(final.cost_usd) == 3 * PER_REQUEST
    (budget_raised,) = [e.budget_raised for e in paused.events if e.HasField("budget_raised")]
    assert (budget_raised.previous_budget_usd, budget_raised.max_budget_usd) == (
        "0.070000",
        "0.200000",
    )
    assert await reserved(h, "pauser") == 0
    listed = await h.sessions.ListSessions(
        session_pb2.ListSessionsRequest(paused=True), metadata=auth("pauser")
    )
    assert list(listed.sessions) == []


async def test_a_pause_that_times_out_ends_the_session_as_without_one(setup: Setup) -> None:
    h = setup.harness
    paused = await until_paused(h.sessions, "brief")
    final = await paused.finish()
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_BUDGET_EXCEEDED
    assert not final.HasField("paused")
    assert Decimal(final.cost_usd) == 2 * PER_REQUEST
    assert await reserved(h, "brief") == 0


async def test_a_request_that_ends_at_its_budget_is_not_paused(setup: Setup) -> None:
    h = setup.harness
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:three]] go",
            model=MODEL,
            max_budget_usd=TWO,
            on_budget_exhausted=session_pb2.ON_BUDGET_EXHAUSTED_END,
        ),
        metadata=auth("pauser"),
    )
    events = [e async for e in call]
    assert not any(e.HasField("paused") for e in events)
    final = events[-1].result.session
    assert final.error.reason == session_pb2.ERROR_REASON_BUDGET_EXCEEDED


async def test_a_raise_the_day_cannot_cover_waits_for_a_raised_daily_limit(
    setup: Setup,
) -> None:
    h = setup.harness
    first = await until_paused(h.sessions, "tight")
    second = await until_paused(h.sessions, "tight")

    # 0.14 of the day's 0.2 is held: raising the first to 0.15 needs 0.08 more.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raise_to(h.sessions, "tight", first.session_id, "0.15")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(refused.value)
    assert details["ErrorInfo"].reason == "BUDGET_EXCEEDED"
    assert "daily_limit_usd" in refused.value.details()
    # Its owner hears of the waiting raise (a notification, then a read of the session).
    waiting = await until(
        h.sessions,
        "tight",
        first.session_id,
        lambda s: s.paused.reason == session_pb2.PAUSE_REASON_DAILY_LIMIT,
    )
    assert waiting.paused.pending_budget_usd == "0.150000"

    # CancelSession ends a paused session.
    cancelled = await h.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=second.session_id), metadata=auth("tight")
    )
    assert cancelled.state == session_pb2.SESSION_STATE_ERROR
    assert cancelled.error.reason == session_pb2.ERROR_REASON_CANCELLED
    assert (await second.finish()).error.reason == session_pb2.ERROR_REASON_CANCELLED

    # A reload that raises the daily limit lets the waiting raise through.
    path = h.work_dir / "tenants.toml"
    path.write_text(path.read_text().replace("daily_limit_usd = 0.2", "daily_limit_usd = 5"))
    assert await h.app.reload_tenants("test") is not None
    final = await first.finish()
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert final.max_budget_usd == "0.150000"
    assert Decimal(final.cost_usd) == 3 * PER_REQUEST
    assert await reserved(h, "tight") == 0


async def test_every_refusal_of_update_session_budget(setup: Setup) -> None:
    h = setup.harness
    paused = await until_paused(h.sessions, "pauser")
    sid = paused.session_id

    async def refusal(tenant: str, session_id: str, amount: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raise_to(h.sessions, tenant, session_id, amount)
        return caught.value

    for session_id, amount, field in (
        ("", "0.2", "session_id"),
        (sid, "", "max_budget_usd"),
        (sid, "lots", "max_budget_usd"),
        (sid, "0.05", "max_budget_usd"),  # lowering
        (sid, "0.1000001", "max_budget_usd"),  # below a micro-dollar
    ):
        err = await refusal("pauser", session_id, amount)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (amount, err)
        assert error_details(err)["BadRequest"].field_violations[0].field == field
    lowered = await refusal("pauser", sid, "0.05")
    assert "can only be raised" in lowered.details()

    over = await refusal("pauser", sid, "1.5")
    assert over.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(over)["ErrorInfo"].reason == "SESSION_BUDGET_MAX"
    assert "max_session_budget_usd" in over.details()

    for tenant, session_id in (
        ("pauser", "00000000-0000-4000-8000-000000000000"),  # no such session
        ("brief", sid),  # another tenant's
        ("pauser", "not-an-id"),
    ):
        err = await refusal(tenant, session_id, "0.2")
        assert err.code() == grpc.StatusCode.NOT_FOUND, (tenant, session_id)

    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await h.sessions.UpdateSessionBudget(
            session_pb2.UpdateSessionBudgetRequest(session_id=sid, max_budget_usd="0.2")
        )
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The budget it already has: nothing changes (a retry is safe).
    same = await raise_to(h.sessions, "pauser", sid, "0.07")
    assert same.max_budget_usd == "0.070000" and same.HasField("paused")

    await raise_to(h.sessions, "pauser", sid, "0.2")
    final = await paused.finish()
    assert final.state == session_pb2.SESSION_STATE_COMPLETE
    ended = await refusal("pauser", sid, "0.3")
    assert ended.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(ended)["ErrorInfo"].reason == "SESSION_ENDED"
    assert await reserved(h, "pauser") == 0


async def test_concurrent_raises_reserve_exactly_the_final_budget(setup: Setup) -> None:
    h = setup.harness
    paused = await until_paused(h.sessions, "pauser")
    sid = paused.session_id
    amounts = [f"0.{n}" for n in range(10, 20)]

    async def attempt(amount: str) -> str:
        try:
            await raise_to(h.sessions, "pauser", sid, amount)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # The first raise covered the held request and the session finished
                # before this one came: refused, nothing reserved.
                assert "already ended" in (err.details() or ""), err
                return "ended"
            # Lower than a raise that won first: refused, nothing reserved.
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            return "lower"
        return "raised"

    outcomes = dict(zip(amounts, await asyncio.gather(*(attempt(a) for a in amounts)), strict=True))
    raised = [Decimal(a) for a, outcome in outcomes.items() if outcome == "raised"]
    assert raised, outcomes
    final = await paused.finish()
    assert final.state == session_pb2.SESSION_STATE_COMPLETE
    # The largest accepted raise is the session's budget, and once the session settles the
    # day holds nothing of it: a raise reserved twice would stay behind in `reserved`.
    assert Decimal(final.max_budget_usd) == max(raised), outcomes
    assert Decimal(final.cost_usd) == 3 * PER_REQUEST
    assert await reserved(h, "pauser") == 0


async def test_the_clients_and_the_cli_show_and_raise_a_paused_session(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    h = setup.harness
    target = f"127.0.0.1:{h.app.port}"

    async def cli(*argv: str) -> tuple[int, str]:
        """The CLI's exit code and output (stdout, then stderr)."""
        code = await asyncio.to_thread(
            main, ["--target", target, "--token", TOKENS["pauser"], *argv]
        )
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    async with AsyncClient(target, token=TOKENS["pauser"]) as client:
        stream = client.run(
            "[[sandbox:three]] go",
            model=MODEL,
            max_budget_usd=TWO,
            on_budget_exhausted="pause",
            callback_url=f"{setup.receiver.base}/cb/mine",
        )
        async for event in stream:
            if event.HasField("paused"):
                break
        sid = event.session_id
        listed = await client.list_sessions(paused=True)
        assert [s.id for s in listed.sessions] == [sid]

        code, out = await cli("list", "--paused")
        assert code == 0 and sid in out and "PAUSED" in out
        code, out = await cli("get", sid)
        assert code == 0 and "paused:      SESSION_BUDGET since" in out
        (hook,) = await setup.receiver.wait(lambda r: r.path == "/cb/mine" and r.verified)
        assert hook.payload["type"] == "session.paused"
        code, out = await cli("deliveries", "--session", sid, "--event", "session.paused")
        assert code == 0 and "session.paused" in out and "callback" in out
        deliveries = await client.list_webhook_deliveries(session_id=sid)
        assert sorted((d.event, d.endpoint) for d in deliveries.deliveries) == [
            ("session.paused", "callback"),
            ("session.paused", "paused"),
        ]

        code, out = await cli("raise-budget", sid, "0.2")
        assert code == 0 and "budget:      $0.200000" in out
        rest = [e async for e in stream]
        final = rest[-1].result.session
        assert final.state == session_pb2.SESSION_STATE_COMPLETE
        assert final.max_budget_usd == "0.200000"
    with pytest.raises(Exception, match="SESSION_ENDED"):
        await asyncio.to_thread(_sync_raise, target, sid)
    code, out = await cli("raise-budget", sid, "0.3")
    assert code == 3 and "SESSION_ENDED" in out


def _sync_raise(target: str, session_id: str) -> None:
    from agentplane import Client

    with Client(target, token=TOKENS["pauser"]) as client:
        client.update_session_budget(session_id, "0.3")


@pytest.mark.slow
async def test_another_replica_raises_a_paused_session_and_it_completes() -> None:
    async with start_replicas(2, scripts={"three": THREE}, extra_tenants=tenants()) as fleet:
        owner, other = fleet[0], fleet[1]
        paused = await until_paused(owner.sessions, "pauser")
        seen = await other.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=paused.session_id), metadata=auth("pauser")
        )
        assert seen.paused.reason == session_pb2.PAUSE_REASON_SESSION_BUDGET

        raised = await raise_to(other.sessions, "pauser", paused.session_id, "0.2")
        assert raised.max_budget_usd == "0.200000"
        final = await asyncio.wait_for(paused.finish(), 120)

        assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
        assert Decimal(final.cost_usd) == 3 * PER_REQUEST
        for replica in (owner, other):
            budget = await budget_pb2_grpc.BudgetServiceStub(replica.channel).GetBudget(
                budget_pb2.GetBudgetRequest(), metadata=auth("pauser")
            )
            assert Decimal(budget.reserved_usd) == 0
            assert Decimal(budget.spent_usd) == 3 * PER_REQUEST


def running_session() -> Session:
    """A RUNNING session of `pauser` with a budget of TWO, held in memory only."""
    return Session(
        id=str(uuid.uuid4()),
        tenant="pauser",
        state=SessionState.RUNNING,
        create_time=utcnow(),
        max_budget_usd=Decimal(TWO),
        max_turns=3,
        allowed_tools=("Glob",),
    )


async def test_a_raise_applied_as_a_pause_begins_wakes_its_held_request(database_url: str) -> None:
    """The race behind concurrent raises: the gateway holds a request its budget refused,
    and a raise is applied before the pause's task first runs. The held request must go on
    (reserve again), not wait for yet another raise until `max_pause_s`."""
    engine = create_engine(database_url)
    await migrate(engine)
    try:
        session = running_session()
        hub = BudgetHub(sessionmaker(engine))
        live = LiveSession(session, persist=lambda events: asyncio.sleep(0))
        budget = hub.session(live, max_pause_s=3600)
        meter = SessionMeter(
            session.id,
            budget_usd=Decimal(TWO),
            upstream_base_url="http://127.0.0.1:9",
            upstream_api_key="unused",
            token="unused",
        )
        budget.attach(meter, pauses=True)
        held = asyncio.ensure_future(budget.hold())
        await asyncio.sleep(0)  # the hold has started its pause task, which has not run yet
        budget.apply(session.evolve(max_budget_usd=Decimal("0.19")))
        # A safety cap only: the raise is already applied, so the hold answers at once.
        assert await asyncio.wait_for(held, timeout=60) is True
        assert meter.budget_usd == Decimal("0.19")
        budget.close()
    finally:
        await engine.dispose()


async def test_a_raise_applied_as_the_session_ends_does_not_take_the_results_number() -> None:
    """The session's end numbers its result, then records it; a raise applied meanwhile
    must not publish an event under that number (the run task would fail on it)."""
    session = running_session()
    live = LiveSession(session, persist=lambda events: asyncio.sleep(0))
    live.emit(EventKind.STARTED, {"session": session.to_json()})
    live.seal()
    seq = live.next_seq
    assert live.emit(EventKind.BUDGET_RAISED, {"max_budget_usd": "0.19"}).seq == seq
    final = session.evolve(state=SessionState.COMPLETE, max_budget_usd=Decimal("0.19"))
    live.publish(result_event(final, seq), persist=False)
    live.end()
    assert [e.kind async for e in live.follow()] == [EventKind.STARTED, EventKind.RESULT]
    await live.writer.close()
