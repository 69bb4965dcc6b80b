"""grpc.health.v1 statuses and the readiness checks behind them."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # the public name of the asyncio servicer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import DatabaseUnavailable, Unavailable
from .sessions.cli_env import NO_OUTBOUND_TRAFFIC
from .store.diagnosis import explain
from .store.engine import migrate, migrations_current

log = logging.getLogger(__name__)

SESSION_SERVICE = "agentplane.v1.SessionService"
READINESS = "readiness"
LIVENESS = "liveness"
# SERVING while every session runs sandboxed; NOT_SERVING names the unsafe opt-out
# (AGENTPLANE_SANDBOX=none), which leaves the server itself serving.
SANDBOX = "agentplane.sandbox"
# NOT_SERVING from a model API request that could not connect (refused, no such host) to
# the next that got an answer: seen per replica without pulling each one's logs. Not a
# readiness input: another replica's network may reach the model API.
MODEL_API = "agentplane.model_api"
# NOT_SERVING while the tenants file on disk is invalid: the server keeps the last valid
# one (callers are still served by it) until the file is fixed. Not a readiness input.
TENANTS = "agentplane.tenants"
# The names that say "send me work": NOT_SERVING until ready, and again on shutdown.
READY_NAMES = ("", SESSION_SERVICE, READINESS)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Servicer(health_aio.HealthServicer):
    """grpcio's servicer, with `List` (which it leaves UNIMPLEMENTED)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: object
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


class Health:
    """Owns the health servicer and the reason the server is not ready, if any."""

    def __init__(self) -> None:
        self.servicer = _Servicer()
        self.problem: str | None = "starting up"
        self._stopping = False
        self._cli_problem: str | None = "not checked yet"
        self._database_down = False
        self._database_fine = False
        self._model_api_reachable = True
        self._sandboxed = True
        self._tenants_valid = True
        self._updates: set[asyncio.Task[None]] = set()

    async def init(self, *, sandboxed: bool = True) -> None:
        self._sandboxed = sandboxed
        for name in READY_NAMES:
            await self.servicer.set(name, NOT_SERVING)
        await self.servicer.set(LIVENESS, SERVING)
        await self.servicer.set(SANDBOX, SERVING if sandboxed else NOT_SERVING)
        await self.servicer.set(MODEL_API, SERVING)
        await self.servicer.set(TENANTS, SERVING)

    def model_api(self, reachable: bool) -> None:
        """The metering gateway reached the model API, or could not connect to it."""
        if reachable == self._model_api_reachable:
            return
        self._model_api_reachable = reachable
        if not reachable:
            log.warning("model_api_unreachable")
        task = asyncio.get_running_loop().create_task(
            self.servicer.set(MODEL_API, SERVING if reachable else NOT_SERVING)
        )
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    async def tenants(self, valid: bool) -> None:
        """The tenants file on disk was read: valid (and applied), or not (ignored)."""
        self._tenants_valid = valid
        await self.servicer.set(TENANTS, SERVING if valid else NOT_SERVING)

    async def _set_ready(self, problem: str | None) -> None:
        self.problem = problem
        status = SERVING if problem is None and not self._stopping else NOT_SERVING
        for name in READY_NAMES:
            await self.servicer.set(name, status)

    def refusal(self) -> Unavailable | None:
        """Why the server takes no new work now, as the error a caller gets (None: it
        does): DatabaseUnavailable while readiness finds the database unreachable."""
        if self.problem is None:
            return None
        if self._database_down and not self._stopping:
            return DatabaseUnavailable(self.problem)
        return Unavailable(self.problem)

    async def check(self, engine: AsyncEngine, cli_path: Path, *, migrate_first: bool) -> None:
        """Check the database, its migrations and the agent CLI; SERVING if all pass."""
        self._cli_problem = await _cli_problem(cli_path)
        problem, detail = await self._database(engine, migrate_first)
        problem = problem or self._cli_problem
        if problem:
            log.error("not ready: %s", detail or problem)
        else:
            log.info("ready: database migrated and agent CLI found")
        await self._set_ready(problem)

    async def monitor(self, engine: AsyncEngine, interval_s: float) -> None:
        """Re-check the database every `interval_s`: readiness follows it down and back up
        without a restart."""
        while not self._stopping:
            await asyncio.sleep(interval_s)
            problem, detail = await self._database(engine, False)
            problem = problem or self._cli_problem
            if problem != self.problem and not self._stopping:
                log.warning("readiness: %s", detail or problem or "ready again")
                await self._set_ready(problem)

    async def _database(
        self, engine: AsyncEngine, migrate_first: bool
    ) -> tuple[str | None, str | None]:
        problem, detail = await _database_problem(engine, migrate_first)
        self._database_down = detail is not None
        self._database_fine = problem is None
        return problem, detail

    def dependencies(self) -> dict[str, bool]:
        """Whether each dependency is fine now (for the metrics): `server` is readiness
        itself; `database` reachable and migrated; `agent_cli` found and starting;
        `model_api` reached by the last model request; `sandbox` in use; `tenants_file`
        valid on disk."""
        return {
            "server": self.problem is None and not self._stopping,
            "database": self._database_fine,
            "agent_cli": self._cli_problem is None,
            "model_api": self._model_api_reachable,
            "sandbox": self._sandboxed,
            "tenants_file": self._tenants_valid,
        }

    async def drain(self) -> None:
        """Draining: every name that invites work goes NOT_SERVING; liveness stays SERVING."""
        self._stopping = True
        self.problem = "the server is shutting down"
        for name in READY_NAMES:
            await self.servicer.set(name, NOT_SERVING)

    async def shutdown(self) -> None:
        """NOT_SERVING for good (liveness too: the process is going away)."""
        self._stopping = True
        self.problem = "the server is shutting down"
        await self.servicer.enter_graceful_shutdown()


async def _database_problem(
    engine: AsyncEngine, migrate_first: bool
) -> tuple[str | None, str | None]:
    """What keeps the database from serving, for callers, and the driver's own words for
    the log (which may name hosts and databases: callers never see them); (None, None) when
    it serves. The detail is None when the database answers but its schema is behind."""
    try:
        async with asyncio.timeout(10), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        if migrate_first:
            await migrate(engine)
        if not await migrations_current(engine):
            return "the database schema is not current: run `agentplane-server migrate`", None
    except Exception as exc:  # noqa: BLE001  (any driver error means "not ready")
        detail = f"the database is unreachable: {explain(exc, engine.url)}"
        return "the database is unreachable; retry later", detail
    return None, None


async def _cli_problem(cli_path: Path) -> str | None:
    if not cli_path.is_file() or not os.access(cli_path, os.X_OK):
        return f"the agent CLI was not found at {cli_path} (set AGENTPLANE_CLI_PATH)"
    env = {**os.environ, **NO_OUTBOUND_TRAFFIC}
    try:
        proc = await asyncio.create_subprocess_exec(
            str(cli_path),
            "--version",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    except (OSError, TimeoutError) as exc:
        return f"the agent CLI at {cli_path} does not start: {exc}"
    if proc.returncode != 0:
        return f"the agent CLI at {cli_path} failed: {out.decode(errors='replace')[:200]}"
    return None
