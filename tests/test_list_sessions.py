"""ListSessions: keyset pagination that stays stable while sessions are created."""

from __future__ import annotations

import grpc
import pytest
from agentplane.server.domain import ErrorReason
from agentplane.server.sessions.run_request import RunRequest
from agentplane.v1 import session_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from harness import MODEL, Harness, error_details

pytestmark = pytest.mark.asyncio


async def admit_cancelled(h: Harness, tenant: str, n: int, label: str) -> list[str]:
    """Sessions admitted for real and cancelled before their agent starts (no CLI run)."""
    ids = []
    for i in range(n):
        admission = await h.app.sessions.start(
            h.app.tenants.tenants[tenant],
            RunRequest(prompt=f"p{i}", model=MODEL, labels={"batch": label}),
        )
        assert admission.live is not None
        admission.live.request_cancel(ErrorReason.CANCELLED)
        async for _ in admission.events:
            pass
        ids.append(admission.session_id)
    return ids


async def page(h: Harness, token: str = "", **filters: object) -> session_pb2.ListSessionsResponse:
    return await h.sessions.ListSessions(
        session_pb2.ListSessionsRequest(page_size=2, page_token=token, **filters),
        metadata=h.auth("ops"),
    )


async def test_pages_stay_stable_while_sessions_are_created(harness: Harness) -> None:
    first_five = await admit_cancelled(harness, "ops", 5, "p")
    newest_first = list(reversed(first_five))

    seen = []
    response = await page(harness, labels={"batch": "p"})
    seen += [s.id for s in response.sessions]
    later = await admit_cancelled(harness, "ops", 3, "p")  # inserted between pages
    while response.next_page_token:
        response = await page(harness, response.next_page_token, labels={"batch": "p"})
        seen += [s.id for s in response.sessions]

    assert seen == newest_first  # each exactly once, none of the new ones, no gap
    fresh = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(labels={"batch": "p"}), metadata=harness.auth("ops")
    )
    assert [s.id for s in fresh.sessions] == list(reversed(later)) + newest_first


async def test_filters_by_creation_time_and_state(harness: Harness) -> None:
    ids = await admit_cancelled(harness, "ops", 4, "t")
    sessions = {
        s.id: s
        for s in (
            await harness.sessions.ListSessions(
                session_pb2.ListSessionsRequest(labels={"batch": "t"}), metadata=harness.auth("ops")
            )
        ).sessions
    }
    start: Timestamp = sessions[ids[1]].create_time
    end: Timestamp = sessions[ids[3]].create_time
    ranged = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(
            labels={"batch": "t"}, create_time_start=start, create_time_end=end
        ),
        metadata=harness.auth("ops"),
    )
    assert [s.id for s in ranged.sessions] == [ids[2], ids[1]]  # start inclusive, end exclusive
    errors = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(
            labels={"batch": "t"}, state=session_pb2.SESSION_STATE_ERROR
        ),
        metadata=harness.auth("ops"),
    )
    assert len(errors.sessions) == 4
    complete = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(
            labels={"batch": "t"}, state=session_pb2.SESSION_STATE_COMPLETE
        ),
        metadata=harness.auth("ops"),
    )
    assert list(complete.sessions) == []


async def test_an_inverted_time_range_or_negative_page_size_is_invalid(harness: Harness) -> None:
    import grpc

    later, earlier = Timestamp(seconds=2_000_000_000), Timestamp(seconds=1_000_000_000)
    for request in (
        session_pb2.ListSessionsRequest(create_time_start=later, create_time_end=earlier),
        session_pb2.ListSessionsRequest(page_size=-1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.sessions.ListSessions(request, metadata=harness.auth("ops"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_label_filters_are_capped_like_session_labels(harness: Harness) -> None:
    too_many = {f"k{i}": "v" for i in range(33)}  # each filter is a join: 150 took seconds
    for labels, field in (
        (too_many, "labels"),
        ({"K" * 64: "v"}, f"labels[{'K' * 64!r}]"),
        ({"k": "v" * 257}, "labels['k']"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.sessions.ListSessions(
                session_pb2.ListSessionsRequest(labels=labels), metadata=harness.auth()
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(caught.value)["BadRequest"].field_violations[0].field == field
    # 32 filters are fine (and match nothing here).
    reply = await harness.sessions.ListSessions(
        session_pb2.ListSessionsRequest(labels={f"k{i}": "v" for i in range(32)}),
        metadata=harness.auth(),
    )
    assert list(reply.sessions) == []
