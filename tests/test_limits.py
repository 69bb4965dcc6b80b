"""Concurrency limits and time limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from agentplane.server.model_double import Script, Step
from agentplane.v1 import session_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    MODEL,
    Harness,
    agent_processes,
    error_details,
    start_harness,
    stop_harness,
    tenant_toml,
)

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
async def tight(database_url: str) -> AsyncIterator[Harness]:
    """A server that runs at most 3 sessions (with the usual idle timeout: its sessions
    must complete, however slowly a loaded machine starts their CLIs)."""
    h = await start_harness(database_url, max_sessions=3)
    h.sandbox.add_script("slow", Script(steps=[Step(text="done", delay_s=1.0)]))
    yield h
    await stop_harness(h)


@pytest.fixture(scope="module")
async def impatient(database_url: str) -> AsyncIterator[Harness]:
    """A server that gives up on a silent agent after 1.5 s: only for sessions meant to
    end TIMEOUT (a slow CLI start makes them end so sooner, never otherwise)."""
    h = await start_harness(database_url, session_idle_timeout_s=1.5)
    h.sandbox.add_script("hang", Script(steps=[Step(hang=True)]))
    yield h
    await stop_harness(h)


def start(h: Harness, tenant: str, prompt: str) -> grpc.aio.UnaryStreamCall:
    return h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=prompt, model=MODEL), metadata=h.auth(tenant)
    )


async def finish(call: grpc.aio.UnaryStreamCall) -> session_pb2.Session:
    last = None
    while (event := await call.read()) is not grpc.aio.EOF:
        last = event
    assert last is not None and last.HasField("result")
    return last.result.session


async def test_a_tenant_over_its_concurrency_limit_is_refused(tight: Harness) -> None:
    running = [start(tight, "globex", "[[sandbox:slow]] one") for _ in range(2)]
    for call in running:
        assert (await call.read()).HasField("started")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tight.run("globex", prompt="three")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(caught.value)
    assert details["ErrorInfo"].reason == "CONCURRENCY_LIMIT"
    assert details["QuotaFailure"].violations[0].subject == "tenant:globex:concurrent_sessions"

    for call in running:
        assert (await finish(call)).state == session_pb2.SESSION_STATE_COMPLETE
    events = await tight.run("globex", prompt="now there is room")
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE


async def test_a_server_over_its_session_limit_is_refused(tight: Harness) -> None:
    running = [start(tight, tenant, "[[sandbox:slow]] x") for tenant in ("acme", "acme", "globex")]
    for call in running:
        assert (await call.read()).HasField("started")
    # Full: admission health turns NOT_SERVING (balanced clients send new sessions
    # elsewhere); readiness stays SERVING (every other call is still served here).
    await until_ready(tight, NOT_SERVING)
    assert await health_of(tight, "readiness") == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tight.run("ops", prompt="four")
    # UNAVAILABLE, which the client's service config retries on another replica (unlike a
    # tenant's own limit, above), with when to retry here.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = error_details(caught.value)
    assert details["ErrorInfo"].reason == "REPLICA_FULL"
    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
    assert "AGENTPLANE_MAX_SESSIONS" in caught.value.details()
    await asyncio.gather(*(finish(call) for call in running))
    await until_ready(tight, SERVING)  # a place freed: it takes sessions again


async def health_of(h: Harness, name: str) -> int:
    health = health_pb2_grpc.HealthStub(h.channel)
    return int((await health.Check(health_pb2.HealthCheckRequest(service=name))).status)


async def until_ready(h: Harness, wanted: int) -> None:
    """Wait (generously) for the server's admission health to become `wanted`."""
    for _ in range(600):
        if await health_of(h, "agentplane.admission") == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agentplane.admission never became {wanted}")


async def test_a_silent_agent_times_out(impatient: Harness) -> None:
    session = await finish(start(impatient, "acme", "[[sandbox:hang]] wait forever"))
    assert session.state == session_pb2.SESSION_STATE_ERROR
    assert session.error.reason == session_pb2.ERROR_REASON_TIMEOUT
    assert "1.5 s" in session.error.message
    assert agent_processes(impatient.work_dir) == []


async def test_a_session_past_its_maximum_duration_times_out(impatient: Harness) -> None:
    # `brief` sessions may run 3 s; a hanging model call outlasts that. The shared server's
    # idle timeout (1.5 s) would end it first, so this uses a server with a long one. (Only
    # this tenant is that brief: on a loaded machine, 3 s fail ordinary sessions too.)
    h = await start_harness(
        impatient.database_url,
        session_idle_timeout_s=30,
        extra_tenants=(
            tenant_toml(
                "brief",
                "brief-token-10",
                anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
                allowed_tools=["Read"],
                max_duration_s=3,
            )
        ),
    )
    try:
        h.sandbox.add_script("hang", Script(steps=[Step(hang=True)]))
        session = await finish(
            h.sessions.RunSession(
                session_pb2.RunSessionRequest(prompt="[[sandbox:hang]] wait", model=MODEL),
                metadata=[("authorization", "Bearer brief-token-10")],
            )
        )
    finally:
        await stop_harness(h)
    assert session.error.reason == session_pb2.ERROR_REASON_TIMEOUT
    assert "maximum of 3 s" in session.error.message


async def test_a_stalled_model_stream_times_out(impatient: Harness) -> None:
    impatient.sandbox.add_script(
        "stall", Script(steps=[Step(text="never finished", stall_after_events=3)])
    )
    session = await finish(start(impatient, "acme", "[[sandbox:stall]] talk"))
    assert session.state == session_pb2.SESSION_STATE_ERROR
    assert session.error.reason == session_pb2.ERROR_REASON_TIMEOUT
    assert agent_processes(impatient.work_dir) == []
