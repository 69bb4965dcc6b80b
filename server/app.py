"""Build the grpc.aio server from settings; start; stop; signal handling."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from agentplane.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine

from .api.budget_service import BudgetService, UsageService
from .api.session_service import SessionService
from .budgets.ledger import BudgetReader
from .config import Settings
from .health import Health
from .sessions.manager import SessionManager
from .sessions.retry import RetryPolicy
from .sessions.runner import BUNDLED_CLI, AgentRunner, RunnerConfig
from .store.engine import create_engine, sessionmaker
from .store.transcripts import SqlSessionStore
from .tenants import TenantRegistry

log = logging.getLogger(__name__)


def load_tenants(settings: Settings) -> TenantRegistry:
    if settings.tenants_file is None:
        return TenantRegistry.dev()
    return TenantRegistry.load(settings.tenants_file)


@dataclass
class App:
    """A running agentplane server."""

    settings: Settings
    tenants: TenantRegistry
    server: grpc.aio.Server
    health: Health
    sessions: SessionManager
    engine: AsyncEngine
    port: int
    _ready_task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, tenants: TenantRegistry | None = None) -> App:
        """Bind, start serving (health NOT_SERVING), then run the readiness checks in the
        background so probes can watch the transition."""
        tenants = tenants or load_tenants(settings)
        if tenants.dev_mode:
            log.warning("no AGENTPLANE_TENANTS_FILE: dev mode, one `default` tenant, no auth")
        engine = create_engine(settings.database_url)
        db = sessionmaker(engine)
        health = Health()
        await health.init()
        cli_path = settings.cli_path or BUNDLED_CLI
        settings.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(t.os_user for t in tenants.tenants.values()):
            # Agents running as tenants' own users must traverse (not list) the root.
            settings.work_dir.chmod(0o711)
        runner = AgentRunner(
            RunnerConfig(
                work_dir=settings.work_dir,
                base_url=settings.anthropic_base_url,
                cli_path=cli_path,
                cli_max_retries=settings.cli_max_retries,
                scrub_env=frozenset(tenants.key_env_names()),
                idle_timeout_s=settings.session_idle_timeout_s,
                retry=RetryPolicy(
                    attempts=settings.retry_attempts, base_delay_s=settings.retry_base_delay_s
                ),
            ),
            SqlSessionStore(db),
        )
        sessions = SessionManager(
            db, runner, not_ready=lambda: health.problem, max_sessions=settings.max_sessions
        )

        server = grpc.aio.server()
        session_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionService(tenants, sessions), server
        )
        budget_pb2_grpc.add_BudgetServiceServicer_to_server(
            BudgetService(tenants, BudgetReader(db)), server
        )
        usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageService(tenants), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
        reflection.enable_server_reflection(
            [
                session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
                budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
                usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        port = server.add_insecure_port(settings.listen)
        if port == 0:
            raise OSError(f"cannot bind {settings.listen}")
        await server.start()
        app = cls(settings, tenants, server, health, sessions, engine, port)
        app._ready_task = asyncio.create_task(
            health.check(engine, cli_path, migrate_first=settings.migrate_at_start)
        )
        log.info("agentplane listening on %s", settings.listen.rsplit(":", 1)[0] + f":{port}")
        return app

    async def ready(self) -> None:
        """Wait for the start-up checks to finish (whatever their verdict)."""
        if self._ready_task is not None:
            await self._ready_task

    async def stop(self, grace: float = 5.0) -> None:
        """Health NOT_SERVING, end live sessions (ERROR/SHUTDOWN, settled), stop serving."""
        log.info("shutdown: stopping with %d live session(s)", self.sessions.live_count)
        await self.health.shutdown()
        if self._ready_task is not None and not self._ready_task.done():
            self._ready_task.cancel()
        await self.sessions.shutdown()
        await self.server.stop(grace)
        await self.engine.dispose()


async def serve(settings: Settings, tenants: TenantRegistry | None = None) -> int:
    """Run until SIGTERM or SIGINT, then stop cleanly. Returns the exit code."""
    app = await App.start(settings, tenants)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    return 0
