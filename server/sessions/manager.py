"""The sessions of this server as `api/` sees them; each job lives in its own module.

build.py           the room built from its configuration (what app.py calls)
parts.py           what the parts share: databases, Capacity, reads, observer, webhooks
admission.py       RunSession: validate, idempotency, resume, capacity, the admission write
run_request.py     what a caller asks for, validated against the tenant's policy
capacity.py        live sessions, admissions and warm agents against the session limit
live.py            a running session's events (observer.py: the telemetry hook)
agents/            launching an agent CLI; the warm pool
run/               the run task: IDLE -> RUNNING, the agent's run, the pump, the end
replicas/          leases and crash recovery, cancel and drain, following other replicas
records/           GetSession, StreamSession, ListSessions, GetUsage, DeleteSession, retention
caller_loop/       the caller's tools, the hook on every tool call, waiting for the caller
workspace/         input files in, artifacts out
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import uuid
from collections.abc import AsyncIterator, Callable

from ..domain import Artifact, Event, Session
from ..errors import Unavailable
from ..store.sessions import SessionFilter
from ..tenants import Tenant
from .admission import Admission, Admitter
from .agents.launcher import Launcher
from .agents.pool import WarmPool
from .caller_loop.inputs import respond
from .parts import SessionParts
from .pauses import BudgetHub, raise_budget
from .records.retention import SessionDeleter
from .replicas.cancel import SessionStopper
from .replicas.leases import LeaseConfig, LeaseKeeper
from .run.lifecycle import SessionLifecycle
from .run.runner import AgentRunner
from .run_request import RunRequest


class SessionManager:
    """Wires admission, lifecycle, queries, cancel and leases over one Capacity."""

    def __init__(
        self,
        parts: SessionParts,
        launcher: Launcher,
        runner: AgentRunner,
        pool: WarmPool | None = None,
        *,
        leases: LeaseConfig | None = None,
        not_ready: Callable[[], Unavailable | None] = lambda: None,
        finish_retry_s: float = 60.0,
    ) -> None:
        """`parts` holds what every part shares (its databases, the one Capacity, the
        reads, the telemetry hook, the webhooks' outbox); `not_ready()` is the error a
        caller gets while the server cannot take work now (None: it can)."""
        self.capacity = parts.capacity
        self.pool = pool
        self.launcher = launcher
        self.folders = launcher.folders
        self.leases = leases or LeaseConfig(owner=f"agentplane-{uuid.uuid4().hex[:12]}")
        self.queries = parts.queries
        self.stopper = SessionStopper(parts.db, parts.capacity, parts.queries)
        self.deleter = SessionDeleter(parts.db, parts.queries)
        self.lease_keeper = LeaseKeeper(
            parts,
            self.leases,
            launcher.folders,
            self.stopper.lost,
            on_cancel=self.stopper.cancelled_elsewhere,
        )
        self._db = parts.db
        # The caller's answer to an input request of a running session (any replica).
        self.respond = functools.partial(respond, parts.db, parts.queries)
        # Raises of running sessions' budgets, and their pauses at it.
        self.budgets = BudgetHub(parts.upkeep_db, parts.webhooks)
        lifecycle = SessionLifecycle(
            parts, runner, pool, finish_retry_s=finish_retry_s, budgets=self.budgets
        )
        self._admitter = Admitter(
            parts, launcher, lifecycle, self.leases, pool, not_ready=not_ready
        )

    async def start(self, tenant: Tenant, request: RunRequest) -> Admission:
        """Admit a session and start it (see `admission.Admitter.admit`)."""
        return await self._admitter.admit(tenant, request)

    async def get(self, tenant: Tenant, session_id: str) -> Session:
        return await self.queries.get(tenant, session_id)

    async def stream(self, tenant: Tenant, session_id: str, after_seq: int) -> AsyncIterator[Event]:
        return await self.queries.stream(tenant, session_id, after_seq)

    async def list(
        self, tenant: Tenant, flt: SessionFilter, *, page_size: int, page_token: str
    ) -> tuple[list[Session], str]:
        return await self.queries.list(tenant, flt, page_size=page_size, page_token=page_token)

    async def cancel(self, tenant: Tenant, session_id: str) -> Session:
        return await self.stopper.cancel(tenant, session_id)

    async def update_budget(self, tenant: Tenant, session_id: str, max_budget_usd: str) -> Session:
        """Raise a session's budget, wherever it runs (see `pauses.raise_budget`)."""
        return await raise_budget(self._db, tenant, session_id, max_budget_usd)

    def limits_raised(self, tenants: dict[str, Tenant]) -> int:
        """A reload changed these tenants' daily limits: retry raises that wait for them."""
        return self.budgets.limits_raised(tenants)

    async def artifacts(self, tenant: Tenant, session_id: str) -> builtins.list[Artifact]:
        return await self.queries.artifacts(tenant, session_id)

    async def artifact(self, tenant: Tenant, session_id: str, path: str) -> Artifact:
        return await self.queries.artifact(tenant, session_id, path)

    async def delete(self, tenant: Tenant, session_id: str) -> None:
        await self.deleter.delete(tenant, session_id)

    def cancel_on_disconnect(self, admission: Admission) -> None:
        """The RunSession caller went away: cancel the session it started (not one it
        re-attached to)."""
        if admission.live is not None:
            self.stopper.disconnected(admission.live)

    def tenants_removed(self, names: set[str]) -> int:
        """Cancel the running sessions of tenants a reload removed; how many."""
        return self.stopper.tenants_removed(names)

    def cancel_removed(self, admission: Admission) -> None:
        """Cancel a session admitted for a tenant that a reload removed meanwhile (after
        the reload's own sweep of the running sessions)."""
        if admission.live is not None:
            self.stopper.tenant_removed(admission.live)

    async def drain(self, grace_s: float, force: asyncio.Event | None = None) -> None:
        """Refuse new sessions, give running ones `grace_s` to finish (or until `force` is
        set), then interrupt the rest (ERROR/SHUTDOWN, settled)."""
        self._admitter.draining = True
        await self.stopper.drain(grace_s, force)

    async def shutdown(self) -> None:
        """Interrupt every live session, recording it ERROR/SHUTDOWN."""
        await self.stopper.shutdown()

    @property
    def live_count(self) -> int:
        return len(self.capacity.live)
