"""Bad input a hostile or careless caller sends: each gets INVALID_ARGUMENT (NOT_FOUND for an
id) with ErrorInfo and a message that quotes at most a little of the input; never INTERNAL
or UNKNOWN, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from agentplane.server.sessions.records.paging import _filter_digest
from agentplane.server.store.sessions import SessionFilter
from agentplane.v1 import budget_pb2, session_pb2, usage_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Harness, error_details
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.asyncio

BIG_ID = "x" * 1_000_000


async def refused(
    call: Awaitable[Any],
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
    field: str | None = None,
) -> str:
    """The error's message, once checked: `code`, ErrorInfo, BadRequest naming `field`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code, (err.code(), err.details())
    details = error_details(err)
    assert details["ErrorInfo"].domain == "agentplane.dev"
    if field is not None:
        assert details["BadRequest"].field_violations[0].field == field
    assert len(err.details() or "") < 400, err.details()[:500]
    return err.details() or ""


def token(body: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


async def test_an_undefined_state_is_invalid(harness: Harness) -> None:
    for state in (99, -1):
        await refused(
            harness.sessions.ListSessions(
                session_pb2.ListSessionsRequest(state=state), metadata=harness.auth()
            ),
            field="state",
        )


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (-62135596801, 0),
        (253402300800, 0),
        (2**62, 0),
        (-(2**62), 0),
        (0, -1),
        (0, 2_000_000_000),
    ],
)
async def test_timestamps_outside_their_range_are_invalid(
    harness: Harness, seconds: int, nanos: int
) -> None:
    bad = Timestamp(seconds=seconds, nanos=nanos)
    await refused(
        harness.sessions.ListSessions(
            session_pb2.ListSessionsRequest(create_time_start=bad), metadata=harness.auth()
        ),
        field="create_time_start",
    )
    await refused(
        harness.sessions.ListSessions(
            session_pb2.ListSessionsRequest(create_time_end=bad), metadata=harness.auth()
        ),
        field="create_time_end",
    )
    await refused(
        harness.usage.GetUsage(usage_pb2.GetUsageRequest(start_time=bad), metadata=harness.auth()),
        field="start_time",
    )
    await refused(
        harness.usage.GetUsage(usage_pb2.GetUsageRequest(end_time=bad), metadata=harness.auth()),
        field="end_time",
    )


async def test_getbudget_takes_exactly_yyyy_mm_dd_within_range(harness: Harness) -> None:
    for day in (
        "9999-12-31",
        "0001-01-01",
        "20261201",
        "2026-W01-1",
        "2026-12-1",
        "２０２６-12-01",
        "2026-12-01\n",
        "x" * 5000,
    ):
        await refused(
            harness.budgets.GetBudget(
                budget_pb2.GetBudgetRequest(date=day), metadata=harness.auth()
            ),
            field="date",
        )
    last = await harness.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(date="9999-12-30"), metadata=harness.auth()
    )
    assert last.date == "9999-12-30"


async def test_money_strings_have_six_decimals(harness: Harness) -> None:
    budget = await harness.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(date="2001-01-01"), metadata=harness.auth()
    )
    for value in (
        budget.limit_usd,
        budget.spent_usd,
        budget.reserved_usd,
        budget.remaining_usd,
        budget.max_session_budget_usd,
    ):
        assert len(value.split(".")[1]) == 6, value
    assert budget.spent_usd == "0.000000"


async def test_page_tokens_with_a_good_digest_but_a_bad_position_are_invalid(
    harness: Harness,
) -> None:
    digest = _filter_digest(SessionFilter())
    good_id = "3f2d6c1e-0b1a-4c3d-9e8f-0123456789ab"
    for body in (
        {"c": "2026-01-01T00:00:00", "i": good_id, "f": digest},  # naive
        {"c": "9999-12-31T23:59:59.999999-23:59", "i": good_id, "f": digest},  # past the end
        {"c": "0001-01-01T00:00:00+23:59", "i": good_id, "f": digest},  # before the start
        {"c": "2026-01-01T00:00:00+00:00", "i": "a\x00b", "f": digest},  # NUL in the id
        {"c": "2026-01-01T00:00:00+00:00", "i": 7, "f": digest},
    ):
        await refused(
            harness.sessions.ListSessions(
                session_pb2.ListSessionsRequest(page_token=token(body)), metadata=harness.auth()
            ),
            field="page_token",
        )
    await refused(
        harness.sessions.ListSessions(
            session_pb2.ListSessionsRequest(page_token="a\x00b"), metadata=harness.auth()
        ),
        field="page_token",
    )


async def test_nul_characters_are_invalid_or_not_found(harness: Harness) -> None:
    run = session_pb2.RunSessionRequest(prompt="hi", labels={"team": "a\x00b"})
    await refused(
        anext(aiter(harness.sessions.RunSession(run, metadata=harness.auth()))),
        field="labels['team']",
    )
    await refused(
        anext(
            aiter(
                harness.sessions.RunSession(
                    session_pb2.RunSessionRequest(prompt="h\x00i"), metadata=harness.auth()
                )
            )
        ),
        field="prompt",
    )
    await refused(
        harness.sessions.ListSessions(
            session_pb2.ListSessionsRequest(labels={"team": "a\x00b"}), metadata=harness.auth()
        ),
        field="labels['team']",
    )
    for session_id in ("a\x00b", BIG_ID, "3F2D6C1E-0B1A-4C3D-9E8F-0123456789AB"):
        await refused(
            harness.sessions.GetSession(
                session_pb2.GetSessionRequest(session_id=session_id), metadata=harness.auth()
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await refused(
            harness.sessions.CancelSession(
                session_pb2.CancelSessionRequest(session_id=session_id), metadata=harness.auth()
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await refused(
            anext(
                aiter(
                    harness.sessions.StreamSession(
                        session_pb2.StreamSessionRequest(session_id=session_id),
                        metadata=harness.auth(),
                    )
                )
            ),
            grpc.StatusCode.NOT_FOUND,
        )


@pytest.mark.parametrize("budget", ["１", "1_0", "1e-3", "+1", " 0x1", "٣", "9" * 5000, "nan"])
async def test_budgets_are_ascii_decimals(harness: Harness, budget: str) -> None:
    run = session_pb2.RunSessionRequest(prompt="hi", max_budget_usd=budget)
    await refused(
        anext(aiter(harness.sessions.RunSession(run, metadata=harness.auth()))),
        field="max_budget_usd",
    )


async def test_a_huge_input_is_quoted_short(harness: Harness) -> None:
    message = await refused(
        anext(
            aiter(
                harness.sessions.RunSession(
                    session_pb2.RunSessionRequest(prompt="hi", labels={"K" * 100_000: "v"}),
                    metadata=harness.auth(),
                )
            )
        )
    )
    assert "100000 characters" in message


@pytest.mark.parametrize(
    "method",
    [
        "/agentplane.v1.SessionService/GetSession",
        "/agentplane.v1.SessionService/StreamSession",
        "/agentplane.v1.BudgetService/GetBudget",
        "/agentplane.v1.UsageService/GetUsage",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ],
)
@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x02\xff\xfe",  # field 1, a string of invalid UTF-8
        b"\x0a\x7f\x00",  # a length running past the end
        b"\xff\xff\xff\xff",  # no message at all
    ],
)
async def test_undecodable_requests_are_invalid(
    harness: Harness, method: str, payload: bytes
) -> None:
    if "Stream" in method or "Watch" in method:
        call = harness.channel.unary_stream(method)(payload, metadata=harness.auth())
        await refused(anext(aiter(call)), field="request")
    else:
        await refused(
            harness.channel.unary_unary(method)(payload, metadata=harness.auth()), field="request"
        )
    health = health_pb2_grpc.HealthStub(harness.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_list_names_every_service(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    listed = await health.List(health_pb2.HealthListRequest())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": serving,
        "readiness": serving,
        "liveness": serving,
        "agentplane.v1.SessionService": serving,
        "agentplane.sandbox": serving,
        "agentplane.model_api": serving,
        "agentplane.tenants": serving,
    }


# -- any value in any field of any request -----------------------------------------------------

# Answers an RPC may give (besides OK), each documented in the protos; with ErrorInfo.
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


# (method, request type, streaming, tenant). RunSession goes as `nokey`: a request that
# passes validation is refused for the missing key, so no agent starts.
def _rpcs() -> list[tuple[str, type, bool, str]]:
    """Every RPC of the API (a new one is covered without listing it): its path, request
    class, whether it streams, and the tenant that calls it (RunSession as `nokey`, whose
    sessions fail at once for want of a key, so the fuzz runs no agents)."""
    rpcs = []
    for module in (session_pb2, budget_pb2, usage_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(
                    (
                        f"/{service.full_name}/{method.name}",
                        message_factory.GetMessageClass(method.input_type),
                        method.server_streaming,
                        "nokey" if method.name == "RunSession" else "acme",
                    )
                )
    return rpcs


RPCS = _rpcs()
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    [
        "",
        "\x00",
        "x" * 5000,
        "9" * 300,
        "2026-12-01",
        "3f2d6c1e-0b1a-4c3d-9e8f-0123456789ab",
        "１",
        "1_0",
        "0.5",
        "-1",
        "nan",
        "Infinity",
    ]
)
int64s = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1, -1, 99, 2**31])


def _value(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return texts
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-(2**31), 2**31 - 1)
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return st.integers(-(2**31), 2**31 - 1)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        well_known = {"google.protobuf.Timestamp": Timestamp, "google.protobuf.Duration": Duration}
        known = well_known.get(field.message_type.full_name)
        if known is not None:
            return st.builds(known, seconds=int64s, nanos=st.integers(-(2**31), 2**31 - 1))
        return st.deferred(lambda: requests(message_factory.GetMessageClass(field.message_type)))
    return int64s


def requests(cls: type) -> st.SearchStrategy[Any]:
    """Messages of `cls` with any value (or none) in each field."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in cls.DESCRIPTOR.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            fields[field.name] = st.dictionaries(texts, texts, max_size=4)
        elif field.is_repeated:
            fields[field.name] = st.lists(_value(field), max_size=4)
        else:
            fields[field.name] = _value(field)

    def build(values: dict[str, Any]) -> Any:
        message = cls()
        for name, value in values.items():
            target = getattr(message, name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            elif isinstance(value, Message):
                target.CopyFrom(value)
            else:
                try:
                    setattr(message, name, value)
                except ValueError:  # out of the field's own range: leave it unset
                    pass
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)


calls = st.one_of(
    *(
        st.tuples(st.just(rpc), requests(rpc[1]).map(lambda m: m.SerializeToString()))
        for rpc in RPCS
    )
) | st.tuples(st.sampled_from(RPCS), st.binary(max_size=64))


async def answer(h: Harness, rpc: tuple[str, type, bool, str], payload: bytes) -> None:
    method, _, streaming, tenant = rpc
    try:
        if streaming:
            call = h.channel.unary_stream(method)(payload, metadata=h.auth(tenant), timeout=10)
            await anext(aiter(call))
            call.cancel()
        else:
            await h.channel.unary_unary(method)(payload, metadata=h.auth(tenant), timeout=10)
    except grpc.aio.AioRpcError as err:
        assert err.code() in DOCUMENTED, (method, payload, err.code(), err.details())
        assert error_details(err)["ErrorInfo"].domain == "agentplane.dev", err.details()


async def still_serving(h: Harness) -> None:
    health = health_pb2_grpc.HealthStub(h.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=calls)
async def test_any_request_gets_ok_or_a_documented_error(
    harness: Harness, call: tuple[tuple[str, type, bool, str], bytes]
) -> None:
    await answer(harness, *call)
    await still_serving(harness)


@pytest.mark.slow
@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=calls)
async def test_any_request_gets_ok_or_a_documented_error_at_length(
    harness: Harness, call: tuple[tuple[str, type, bool, str], bytes]
) -> None:
    await answer(harness, *call)
    await still_serving(harness)


# -- answers that said too much, or too little ----------------------------------------------


async def test_the_init_event_shows_no_server_paths_and_the_session_its_model(
    harness: Harness,
) -> None:
    events = await harness.run("acme", prompt="hello", model="")  # no model asked for
    (init,) = [e for e in events if e.HasField("system") and e.system.subtype == "init"]
    data = json.loads(init.system.data_json)
    assert str(harness.work_dir) not in init.system.data_json
    for key in ("cwd", "original_cwd", "messaging_socket_path"):
        assert key not in data
    assert data["tools"] and data["model"]  # what callers can use stays
    final = events[-1].result.session
    assert final.model == data["model"]  # the model that ran, though none was asked for
    stored = await harness.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=final.id), metadata=harness.auth()
    )
    assert stored.model == data["model"]
