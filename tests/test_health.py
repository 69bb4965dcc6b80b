"""Health Check/Watch transitions, reflection, and the missing-CLI path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from agentplane.server.app import App
from agentplane.server.config import Settings
from agentplane.server.tenants import TenantRegistry
from agentplane.v1 import session_pb2, session_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def settings(database_url: str, work_dir: Path, **kw: object) -> Settings:
    return Settings(
        listen="127.0.0.1:0", database_url=database_url, work_dir=work_dir, auto_migrate=True, **kw
    )  # type: ignore[arg-type]


async def test_health_goes_serving_when_ready_and_not_serving_on_shutdown(
    database_url: str,
    short_tmp: Path,
) -> None:
    app = await App.start(settings(database_url, short_tmp), TenantRegistry.dev())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    seen = [(await watch.read()).status]
    if seen[0] != SERVING:
        seen.append((await watch.read()).status)
    assert seen == [NOT_SERVING, SERVING]  # the checks run after the port opens
    for name in ("", "agentplane.v1.SessionService", "readiness", "liveness"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    stopping = asyncio.create_task(app.stop(grace=2))
    assert (await watch.read()).status == NOT_SERVING
    await stopping
    await channel.close()


async def test_reflection_lists_the_services(database_url: str, short_tmp: Path) -> None:
    app = await App.start(settings(database_url, short_tmp), TenantRegistry.dev())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        reply = await call.read()
        names = {s.name for s in reply.list_services_response.service}
    await app.stop(grace=1)
    assert {
        "agentplane.v1.SessionService",
        "agentplane.v1.BudgetService",
        "agentplane.v1.UsageService",
        "grpc.health.v1.Health",
    } <= names


async def test_a_missing_cli_keeps_the_server_not_serving_and_refuses_sessions(
    database_url: str,
    short_tmp: Path,
) -> None:
    missing = Path("/nonexistent/claude")
    app = await App.start(settings(database_url, short_tmp, cli_path=missing), TenantRegistry.dev())
    await app.ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "agentplane.v1.SessionService", "readiness"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == NOT_SERVING, name
        assert (
            await health.Check(health_pb2.HealthCheckRequest(service="liveness"))
        ).status == SERVING
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in sessions.RunSession(session_pb2.RunSessionRequest(prompt="hi")):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert str(missing) in caught.value.details()
        listed = await sessions.ListSessions(session_pb2.ListSessionsRequest())
        assert list(listed.sessions) == []
    await app.stop(grace=1)
