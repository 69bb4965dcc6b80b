"""The sessions of this server as `api/` sees them; each job lives in its own module.

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
import uuid
from collections.abc import AsyncIterator, Callable

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..domain import Artifact, Event, InputAnswer, InputKind, InputRequest, Session
from ..errors import Unavailable
from ..store.sessions import SessionFilter
from ..tenants import Tenant
from ..webhooks.outbox import WebhookOutbox
from .admission import Admission, Admitter
from .agents.launcher import Launcher
from .agents.pool import WarmPool
from .caller_loop.inputs import InputHub, respond
from .capacity import Capacity
from .observer import NullObserver, SessionObserver
from .records.queries import SessionQueries
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
        db: async_sessionmaker[DbSession],
        launcher: Launcher,
        runner: AgentRunner,
        capacity: Capacity,
        *,
        pool: WarmPool | None = None,
        observer: SessionObserver | None = None,
        leases: LeaseConfig | None = None,
        not_ready: Callable[[], Unavailable | None] = lambda: None,
        finish_retry_s: float = 60.0,
        upkeep_db: async_sessionmaker[DbSession] | None = None,
        webhooks: WebhookOutbox | None = None,
    ) -> None:
        """`upkeep_db` (default: `db`) serves what running sessions write (events, model
        requests, leases, their end): a pool of its own, so callers that exhaust `db`'s
        connections cannot fail a running session. `webhooks` writes the deliveries that
        sessions' ends and requests to their callers owe, in their transactions."""
        upkeep = upkeep_db or db
        observer = observer or NullObserver()
        self.capacity = capacity
        self.pool = pool
        self.folders = launcher.folders
        self.leases = leases or LeaseConfig(owner=f"agentplane-{uuid.uuid4().hex[:12]}")
        self.queries = SessionQueries(db, capacity)
        self.stopper = SessionStopper(db, capacity, self.queries)
        self.deleter = SessionDeleter(db, self.queries)
        self.lease_keeper = LeaseKeeper(
            upkeep,
            self.leases,
            capacity,
            launcher.folders,
            self.stopper.lost,
            on_cancel=self.stopper.cancelled_elsewhere,
            webhooks=webhooks,
        )
        self._db = db
        # Running sessions wait for their callers' answers through the upkeep pool.
        lifecycle = SessionLifecycle(
            upkeep,
            runner,
            capacity,
            self.queries,
            observer,
            pool,
            inputs=InputHub(upkeep, webhooks),
            finish_retry_s=finish_retry_s,
            webhooks=webhooks,
        )
        self._admitter = Admitter(
            db,
            launcher,
            capacity,
            self.queries,
            lifecycle,
            observer,
            self.leases,
            pool,
            not_ready=not_ready,
            upkeep_db=upkeep,
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

    async def respond(
        self,
        tenant: Tenant,
        session_id: str,
        request_id: str,
        kind: InputKind,
        answer: InputAnswer,
    ) -> tuple[InputRequest, InputAnswer]:
        """The caller's answer to an input request of a running session (any replica)."""
        return await respond(self._db, self.queries, tenant, session_id, request_id, kind, answer)

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
