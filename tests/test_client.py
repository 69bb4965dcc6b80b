"""The Python client (sync and asyncio) against the real server."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal

import grpc
import pytest
from agentplane import (
    AgentplaneError,
    AsyncClient,
    Client,
    FieldViolation,
    HealthStatus,
    QuotaViolation,
    RPCError,
)
from agentplane._health import decode_response, encode_request
from agentplane.server.model_double.script import Script, Step, Usage
from agentplane.v1 import session_pb2
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from harness import MODEL, TOKENS, Harness

COMPLETE = session_pb2.SESSION_STATE_COMPLETE


def target(h: Harness) -> str:
    return f"127.0.0.1:{h.app.port}"


def kinds(events: list[session_pb2.SessionEvent]) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


def assert_complete_run(events: list[session_pb2.SessionEvent], text: str) -> session_pb2.Session:
    assert kinds(events)[0] == "started" and kinds(events)[-1] == "result"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.session_id == events[0].session_id for e in events)
    uuid.UUID(events[0].session_id)
    final = events[-1].result.session
    assert final.state == COMPLETE and final.result == text
    assert Decimal(final.cost_usd) > 0
    return final


async def test_the_sync_client_runs_a_session_and_reads_it_back(harness: Harness) -> None:
    harness.sandbox.add_script(
        "client_sync", Script(steps=[Step(text="sync says hi", usage=Usage(1000, 50))])
    )

    def work() -> tuple:
        with Client(target(harness), token=TOKENS["acme"], timeout=10) as client:
            events = list(
                client.run(
                    "[[sandbox:client_sync]] hello",
                    model=MODEL,
                    max_budget_usd=Decimal("0.25"),
                    max_turns=3,
                    allowed_tools=["Read"],
                    labels={"via": "sync-client"},
                    request_id=uuid.uuid4(),
                )
            )
            got = client.get_session(events[0].session_id)
            page = client.list_sessions(page_size=1, labels={"via": "sync-client"})
            every = list(client.iter_sessions(page_size=1, limit=3, state="complete"))
            today = client.get_budget()
            past = client.get_budget(dt.date(2020, 1, 1))
            health = client.health()
        return events, got, page, every, today, past, health

    events, got, page, every, today, past, health = await asyncio.to_thread(work)

    final = assert_complete_run(events, "sync says hi")
    assert Decimal(final.max_budget_usd) == Decimal("0.25") and final.max_turns == 3
    assert list(final.allowed_tools) == ["Read"]
    assert got == final
    assert [s.id for s in page.sessions] == [final.id]
    assert 1 <= len(every) <= 3 and all(s.state == COMPLETE for s in every)
    assert every[0].id == final.id  # newest first, across pages of one
    assert today.tenant == "acme" and Decimal(today.spent_usd) >= Decimal(final.cost_usd)
    assert past.date == "2020-01-01" and Decimal(past.spent_usd) == 0
    assert health is HealthStatus.SERVING


async def test_the_async_client_runs_a_session_and_reads_it_back(harness: Harness) -> None:
    harness.sandbox.add_script(
        "client_async", Script(steps=[Step(text="async says hi", usage=Usage(1000, 50))])
    )

    async with AsyncClient(target(harness), token=TOKENS["acme"], timeout=10) as client:
        events = [
            e
            async for e in client.run(
                "[[sandbox:client_async]] hello", model=MODEL, labels={"via": "async-client"}
            )
        ]
        final = assert_complete_run(events, "async says hi")
        assert await client.get_session(uuid.UUID(final.id)) == final
        page = await client.list_sessions(labels={"via": "async-client"})
        assert [s.id for s in page.sessions] == [final.id] and not page.next_page_token
        listed = [s.id async for s in client.iter_sessions(page_size=1, limit=2)]
        assert listed[0] == final.id and 1 <= len(listed) <= 2
        budget = await client.get_budget("2020-01-01")
        assert budget.date == "2020-01-01" and Decimal(budget.limit_usd) == 50
        assert await client.health("readiness") is HealthStatus.SERVING


async def test_leaving_a_run_early_cancels_the_session(harness: Harness) -> None:
    # The model never answers: only the cancel can end the session, however long it takes.
    harness.sandbox.add_script("client_slow", Script(steps=[Step(hang=True)]))

    async with AsyncClient(target(harness), token=TOKENS["acme"], timeout=10) as client:
        async with client.run("[[sandbox:client_slow]] wait", model=MODEL) as stream:
            first = await anext(stream)
        assert first.HasField("started")
        for _ in range(600):
            session = await client.get_session(first.session_id)
            if session.state == session_pb2.SESSION_STATE_ERROR:
                break
            await asyncio.sleep(0.1)
    assert session.state == session_pb2.SESSION_STATE_ERROR
    assert session.error.reason == session_pb2.ERROR_REASON_CANCELLED


async def test_invalid_arguments_carry_code_reason_and_the_field(harness: Harness) -> None:
    async with AsyncClient(target(harness), token=TOKENS["acme"]) as client:
        with pytest.raises(RPCError) as caught:
            async for _ in client.run("", model=MODEL):
                pass
        err = caught.value
        assert isinstance(err, AgentplaneError)
        assert isinstance(err.__cause__, grpc.aio.AioRpcError)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.reason == "INVALID_ARGUMENT" and err.domain == "agentplane.dev"
        assert [v.field for v in err.field_violations] == ["prompt"]
        assert "prompt" in err.message
        assert str(err).startswith("INVALID_ARGUMENT: ")

    def over_budget() -> RPCError:
        with Client(target(harness), token=TOKENS["globex"]) as client:
            stream = client.run("hi", max_budget_usd=Decimal("0.75"))
            with pytest.raises(RPCError) as caught:
                next(stream)
            return caught.value

    err = await asyncio.to_thread(over_budget)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field_violations[0].field == "max_budget_usd"
    assert isinstance(err.__cause__, grpc.RpcError)


async def test_a_bad_token_is_unauthenticated_for_every_call(harness: Harness) -> None:
    def calls() -> list[RPCError]:
        errors = []
        with Client(target(harness), token="wrong-token") as client:
            for call in (
                client.get_budget,
                lambda: client.list_sessions(),
                lambda: next(client.run("hi")),
            ):
                with pytest.raises(RPCError) as caught:
                    call()
                errors.append(caught.value)
        return errors

    errors = await asyncio.to_thread(calls)
    assert {e.code for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    assert all(e.reason == "UNAUTHENTICATED" and "wrong-token" not in str(e) for e in errors)


async def test_missing_sessions_are_not_found(harness: Harness) -> None:
    async with AsyncClient(target(harness), token=TOKENS["acme"]) as client:
        with pytest.raises(RPCError) as caught:
            await client.get_session(uuid.uuid4())
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert caught.value.reason == "NOT_FOUND"
        # Not in every release yet: either implemented (NOT_FOUND) or UNIMPLEMENTED.
        with pytest.raises(RPCError) as caught:
            await client.cancel_session(uuid.uuid4())
        assert caught.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)
        with pytest.raises(RPCError) as caught:
            async for _ in client.stream_session(uuid.uuid4()):
                pass
        assert caught.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)


async def test_health_and_unknown_services(harness: Harness) -> None:
    async with AsyncClient(target(harness)) as client:
        assert await client.health() is HealthStatus.SERVING
        with pytest.raises(RPCError) as caught:
            await client.health("no.such.Service")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND

    def sync_health() -> HealthStatus:
        with Client(target(harness)) as client:
            return client.health("agentplane.v1.SessionService")

    assert await asyncio.to_thread(sync_health) is HealthStatus.SERVING


async def test_target_and_token_come_from_the_environment(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTPLANE_TARGET", target(harness))
    monkeypatch.setenv("AGENTPLANE_TOKEN", TOKENS["globex"])
    async with AsyncClient() as client:
        assert client.target == target(harness)
        assert (await client.get_budget()).tenant == "globex"
        explicit = AsyncClient(token=TOKENS["small"])
        assert (await explicit.get_budget()).tenant == "small"
        await explicit.close()
    monkeypatch.delenv("AGENTPLANE_TARGET")
    with Client() as default:
        assert default.target == "127.0.0.1:50051"


def test_rich_status_details_are_decoded() -> None:
    def pack(message: object) -> any_pb2.Any:
        packed = any_pb2.Any()
        packed.Pack(message)
        return packed

    status = status_pb2.Status(
        code=8,
        message="window full",
        details=[
            pack(
                error_details_pb2.ErrorInfo(
                    reason="BUDGET_EXCEEDED", domain="agentplane.dev", metadata={"tenant": "small"}
                )
            ),
            pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject="tenant:small:daily_usd", description="0.6 of 1.0 held"
                        )
                    ]
                )
            ),
            pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field="x", description="bad")
                    ]
                )
            ),
        ],
    )

    class FakeError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return "window full"

        def trailing_metadata(self) -> tuple:
            return (("grpc-status-details-bin", status.SerializeToString()),)

    err = RPCError.from_grpc(FakeError())
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "BUDGET_EXCEEDED"
    assert err.metadata == {"tenant": "small"}
    assert err.quota_violations == (QuotaViolation("tenant:small:daily_usd", "0.6 of 1.0 held"),)
    assert err.field_violations == (FieldViolation("x", "bad"),)
    assert str(err) == "RESOURCE_EXHAUSTED (BUDGET_EXCEEDED): window full"
    bare = RPCError.from_grpc(grpc.RpcError())
    assert bare.code == grpc.StatusCode.UNKNOWN and bare.reason == "" and bare.status is None


def test_the_health_messages_round_trip_the_wire_format() -> None:
    from grpc_health.v1 import health_pb2  # the server's dependency, used only to check

    for name in ("", "readiness", "x" * 300):
        assert health_pb2.HealthCheckRequest.FromString(encode_request(name)).service == name
    for status in (0, 1, 2, 3):
        wire = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert decode_response(wire) == status
    assert decode_response(b"\x08\x07") is HealthStatus.UNKNOWN
    assert decode_response(b"\x12\x02hi\x08\x02") is HealthStatus.NOT_SERVING
