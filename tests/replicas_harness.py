"""Several agentplane replicas as an operator runs them: real `agentplane-server serve`
processes on loopback, one fresh PostgreSQL database, one sandbox model, one tenants file
and one work folder between them.

    async with start_replicas(3, scripts={...}, AGENTPLANE_SHUTDOWN_GRACE_S="20") as fleet:
        client = AsyncClient(fleet.addresses, token=...)   # balanced over the three
        fleet[1].terminate()                               # SIGTERM one of them

For tests of drain, cancel through each replica, followers on each replica, kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from agentplane.server.model_double import SandboxServer, Script
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from agentplane.server.store.models import SessionRow
from agentplane.v1 import session_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    TEST_PG_URL,
    PostgresDatabase,
    agent_processes,
    short_dir,
    tenants_toml,
    write_tenants,
)
from sqlalchemy import select
from test_server_process import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

requires_postgres = pytest.mark.skipif(
    not TEST_PG_URL, reason="replicas share PostgreSQL: set AGENTPLANE_TEST_DATABASE_URL"
)


@dataclass
class Replica:
    """One server process, and a plain channel to it alone (no balancing, no retries)."""

    proc: asyncio.subprocess.Process
    port: int
    log: Path
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sessions(self) -> session_pb2_grpc.SessionServiceStub:
        return session_pb2_grpc.SessionServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    async def status(self, service: str = "") -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)

    async def wait_status(self, wanted: int, service: str = "", timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"{self.address} exited {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                if await self.status(service) == wanted:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"health {service!r} of {self.address} never became {wanted}")

    def terminate(self) -> None:
        """SIGTERM: the replica drains (see server/app.py)."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """kill -9."""
        self.proc.kill()

    async def wait(self, timeout: float = 60) -> int:
        """Its exit code, once it has exited."""
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def log_lines(self) -> list[str]:
        """Its log so far (JSON lines on stderr)."""
        return self.log.read_text(errors="replace").splitlines()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_lines()[-lines:])


async def start_server(
    work: Path, database_url: str, model_url: str, *, ready_within: float = 60, **env: str
) -> Replica:
    """`agentplane-server serve` on a free loopback port, its tenants file and work dir in
    `work`, logging to `work/server-<port>.log`; `env` over the test defaults. Returns once
    it is SERVING (AssertionError if not within `ready_within` seconds)."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    full.update(
        {
            "AGENTPLANE_LISTEN": f"127.0.0.1:{port}",
            "AGENTPLANE_DATABASE_URL": database_url,
            "AGENTPLANE_AUTO_MIGRATE": "1",
            "AGENTPLANE_TENANTS_FILE": str(work / "tenants.toml"),
            "AGENTPLANE_WORK_DIR": str(work / "w"),
            "AGENTPLANE_CLI_MAX_RETRIES": "0",
            "AGENTPLANE_TEST_ACME_KEY": "sk-ant-test-acme-key",
            "ANTHROPIC_BASE_URL": model_url,
            **env,
        }
    )
    log = work / f"server-{port}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentplane.server", "serve", env=full, stderr=out
        )
    replica = Replica(proc, port, log, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    try:
        await replica.wait_status(SERVING, timeout=ready_within)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return replica


@dataclass
class Replicas:
    """Running replicas on one database, with their shared sandbox model and folder."""

    sandbox: SandboxServer
    work: Path
    database_url: str
    replicas: list[Replica] = field(default_factory=list)

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def addresses(self) -> list[str]:
        """ "host:port" of each replica, for a balanced client."""
        return [r.address for r in self.replicas]

    async def start(self, *, ready_within: float = 60, **env: str) -> Replica:
        """One more replica (the database is already migrated); returns once it is SERVING."""
        replica = await start_server(
            self.work,
            self.database_url,
            self.sandbox.base_url,
            ready_within=ready_within,
            AGENTPLANE_AUTO_MIGRATE="0",
            **env,
        )
        self.replicas.append(replica)
        return replica

    async def sessions(self) -> list[SessionRow]:
        """Every session row in the database."""
        engine = create_engine(self.database_url)
        try:
            async with sessionmaker(engine)() as db:
                return list(await db.scalars(select(SessionRow)))
        finally:
            await engine.dispose()

    async def close(self) -> None:
        """Stop the replicas still running (SIGTERM, then kill -9 after 15 s: a failed test
        must not leave a server behind), close the channels and the sandbox model."""
        running = [r for r in self.replicas if r.proc.returncode is None]
        for replica in running:
            replica.terminate()
        for replica in running:
            try:
                await replica.wait(15)
            except TimeoutError:
                replica.kill()
                await replica.proc.wait()
        for replica in self.replicas:
            await replica.channel.close()
        await self.sandbox.stop()


@contextlib.asynccontextmanager
async def start_replicas(
    n: int,
    *,
    scripts: Mapping[str, Script] | None = None,
    extra_tenants: str = "",
    server_url: str = "",
    **env: str,
) -> AsyncIterator[Replicas]:
    """`n` replicas on a fresh PostgreSQL database (dropped afterwards) of `server_url`'s
    server (default: the test server), started at once, each SERVING; `env` is their
    environment on top of the harness's (e.g. AGENTPLANE_SHUTDOWN_GRACE_S). Tenants: the
    harness's (`harness.TOKENS`) and `extra_tenants` (TOML). On exit no agent process may
    be left."""
    if not TEST_PG_URL:
        pytest.skip("replicas share PostgreSQL: set AGENTPLANE_TEST_DATABASE_URL")
    database = PostgresDatabase(server_url or TEST_PG_URL)
    url = database.create()
    work = short_dir()
    try:
        workspace = work / "tpl"
        workspace.mkdir()
        write_tenants(work, tenants_toml(workspace), extra_tenants)
        engine = create_engine(url)  # migrated once, here: concurrent migrations would race
        try:
            await migrate(engine)
        finally:
            await engine.dispose()
        sandbox = SandboxServer(scripts=dict(scripts or {}))
        await sandbox.start()
        fleet = Replicas(sandbox, work, url)
        try:
            await asyncio.gather(*(fleet.start(**env) for _ in range(n)))
            yield fleet
        finally:
            await fleet.close()
        assert agent_processes(work) == [], "agent processes outlived their servers"
    finally:
        database.drop()
        shutil.rmtree(work, ignore_errors=True)
