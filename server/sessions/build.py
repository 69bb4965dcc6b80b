"""The sessions room built from its configuration, in one place: `app.py` calls this and
needs no other module of the room but `manager.py` (and `parts.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import Unavailable
from ..gateway.proxy import MeteringGateway
from ..sandbox.sandboxes import Sandboxes
from ..store.transcripts import SqlSessionStore
from ..tenants import Tenant
from .agents.launcher import BUNDLED_CLI, LaunchConfig, Launcher
from .agents.pool import PoolConfig, WarmPool
from .manager import SessionManager
from .parts import SessionParts
from .replicas.leases import LeaseConfig
from .run.retry import RetryPolicy
from .run.runner import AgentRunner, RunnerConfig

__all__ = [
    "BUNDLED_CLI",
    "LaunchConfig",
    "LeaseConfig",
    "PoolConfig",
    "RetryPolicy",
    "RunnerConfig",
    "SessionsConfig",
    "build_sessions",
]


@dataclass(frozen=True)
class SessionsConfig:
    """How agents are launched and run, the warm pool's limits and this server's leases."""

    launch: LaunchConfig
    runner: RunnerConfig
    pool: PoolConfig
    leases: LeaseConfig


def build_sessions(
    config: SessionsConfig,
    parts: SessionParts,
    gateway: MeteringGateway,
    sandboxes: Sandboxes | None,
    tenants: Iterable[Tenant],
    *,
    not_ready: Callable[[], Unavailable | None],
) -> SessionManager:
    """The launcher (metered by `gateway`, sandboxed by `sandboxes`; None: unsandboxed),
    the runner, the warm pool of `tenants` and the manager over them. Opens nothing: the
    pool starts its agents when the server is ready."""
    launcher = Launcher(config.launch, SqlSessionStore(parts.upkeep_db), gateway, sandboxes)
    runner = AgentRunner(config.runner, launcher)
    pool = WarmPool(
        launcher,
        tenants,
        parts.capacity,
        config=config.pool,
        on_served=parts.observer.pool_served,
    )
    return SessionManager(parts, launcher, runner, pool, leases=config.leases, not_ready=not_ready)
