"""The server as an operator runs it: a real process, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(work: Path, port: int) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    env.update(
        AGENTPLANE_LISTEN=f"127.0.0.1:{port}",
        AGENTPLANE_DATABASE_URL=f"sqlite:///{work}/ap.db",
        AGENTPLANE_WORK_DIR=str(work / "w"),
        ANTHROPIC_BASE_URL="http://127.0.0.1:9",  # never called: no session runs here
    )
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentplane.server",
        "serve",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_serving(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the server never became SERVING")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_server_cleanly(sig: signal.Signals, short_tmp: Path) -> None:
    work = short_tmp
    port = free_port()
    proc = await start_server(work, port)
    await wait_serving(port)
    proc.send_signal(sig)
    code = await asyncio.wait_for(proc.wait(), timeout=20)
    stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, stderr
    assert "dev mode" in stderr  # no tenants file: it says it runs without auth
    assert "shutdown" in stderr
    assert (work / "ap.db").exists()  # the default SQLite file was created and migrated
