"""Admission: a RunSession becomes a session, or is refused with nothing created.

In order: the request is checked against the tenant's policy, a resume is resolved, a
repeated request_id re-attaches to the session it started, the server must be ready and
have room, and then one transaction inserts the session (IDLE) with its `started` event
and reserves its budget in the tenant's day window.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

from sqlalchemy.exc import IntegrityError

from ..domain import Event, EventKind, Session, SessionState, utcnow
from ..errors import (
    AgentplaneError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unavailable,
)
from ..mcp.cli_config import session_servers
from ..mcp.servers import problem as mcp_problem
from ..money.ledger import reserve_for_session
from ..money.windows import day_of
from ..store import sessions as repo
from ..tenants import Tenant
from .agents.launcher import Launcher
from .agents.pool import WarmAgent, WarmPool
from .live import LiveSession
from .parts import SessionParts
from .replicas.leases import LeaseConfig
from .run.lifecycle import SessionLifecycle
from .run_request import RunRequest, SessionSpec, validate

log = logging.getLogger(__name__)


@dataclass
class Admission:
    """An admitted (or re-attached) session and its event stream."""

    session_id: str
    events: AsyncIterator[Event]
    # The session started by this admission; None when it re-attached to an earlier one.
    live: LiveSession | None


class Admitter:
    """Admits sessions (see the module docstring) and hands them to their lifecycle."""

    def __init__(
        self,
        parts: SessionParts,
        launcher: Launcher,
        lifecycle: SessionLifecycle,
        leases: LeaseConfig,
        pool: WarmPool | None = None,
        *,
        not_ready: Callable[[], Unavailable | None] = lambda: None,
    ) -> None:
        """`not_ready()` is the error a caller gets while the server cannot take work now
        (None: it can)."""
        db = parts.db
        self._db = db
        self._upkeep_db = parts.upkeep_db  # the running sessions' own pool
        self._launcher = launcher
        self._capacity = parts.capacity
        self._queries = parts.queries
        self._lifecycle = lifecycle
        self._observer = parts.observer
        self._leases = leases
        self._pool = pool
        self._not_ready = not_ready
        self.draining = False
        # At most one write of a session's events per interval (see EventWriter): an event
        # after a quiet spell is written at once. Followers on other replicas read events
        # once committed, so PostgreSQL's is short; SQLite serves one server, whose
        # followers read memory, and fewer writes leave more of its one writer lock.
        self.event_write_interval_s = 0.02 if db.kw["bind"].dialect.name == "postgresql" else 0.05

    async def admit(self, tenant: Tenant, request: RunRequest) -> Admission:
        """Admit a session (persist it IDLE and reserve its budget, atomically) and start it.

        A repeat of a request_id re-attaches to the session it started instead. Raises
        InvalidArgument, NotFound, FailedPrecondition, QuotaExceeded or Unavailable; then
        nothing is created.
        """
        try:
            return await self._admit(tenant, request)
        except AgentplaneError as exc:
            reason = exc.reason
            self._observer.rejected(tenant.name, reason)
            detail = {"detail": str(exc)} if isinstance(exc, QuotaExceeded) else {}
            log.info(
                "budget_rejected" if reason == "BUDGET_EXCEEDED" else "admission_rejected",
                extra={"tenant": tenant.name, "reason": reason, **detail},
            )
            raise

    async def _admit(self, tenant: Tenant, request: RunRequest) -> Admission:
        spec = validate(request, tenant)
        self._launcher.check_model(spec.model)
        self._launcher.check_model(spec.fallback_model, field="fallback_model")
        if spec.resume_session_id:
            spec = await self._resolve_resume(tenant, spec)
        if spec.request_id:
            earlier = await self._by_request_id(tenant, spec)
            if earlier is not None:
                return earlier
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        refusal = self._not_ready()
        if refusal is not None:
            raise refusal
        if not tenant.api_key():
            raise FailedPrecondition(
                f"tenant {tenant.name!r} has no Anthropic API key: set the environment "
                f"variable {tenant.anthropic_api_key_env} for the server"
            )
        missing = mcp_problem(session_servers(spec.tools, tenant.mcp_servers))
        if missing is not None:
            raise FailedPrecondition(f"tenant {tenant.name!r}: {missing}")
        warm = self._pool.take(tenant, spec) if self._pool is not None else None
        self._capacity.begin_admission(warm=warm is not None)
        admission: Admission | None = None
        try:
            admission = await self._insert(tenant, spec, warm)
        finally:
            live = admission.live if admission is not None else None
            if live is not None:
                self._capacity.admitted(live)
            else:
                self._capacity.not_admitted(warm_returned=warm is not None)
            if self._pool is not None and live is not None:
                self._pool.served(tenant.name, hit=warm is not None)
            if self._pool is not None and warm is not None and live is None:
                self._pool.give_back(warm)  # not admitted (or a repeat): still unused
        if live is not None:
            self._start(live, spec, tenant, warm)
        assert admission is not None
        return admission

    async def _insert(self, tenant: Tenant, spec: SessionSpec, warm: WarmAgent | None) -> Admission:
        """The admission transaction, with the id of `warm` (a warm agent made for it) or
        a new one. A request_id that a concurrent request won re-attaches to its session."""
        now = utcnow()
        trace_id, trace_span_id = self._observer.current_trace()
        session = Session(
            id=warm.session_id if warm is not None else str(uuid.uuid4()),
            tenant=tenant.name,
            state=SessionState.IDLE,
            create_time=now,
            max_budget_usd=spec.budget_usd,
            max_turns=spec.max_turns,
            allowed_tools=spec.tools,
            model=spec.model,
            labels=spec.labels,
            request_id=spec.request_id,
            resumed_from=spec.resume_session_id,
            caller_tools=tuple(t.name for t in spec.caller_tools),
            require_approval=spec.require_approval,
            output_schema=spec.output_schema_json,
            trace_id=trace_id,
            trace_span_id=trace_span_id,
            callback_url=spec.callback_url,
        )
        live = LiveSession(
            session,
            self._persist_events,
            self._observer.event,
            write_interval_s=self.event_write_interval_s,
            limits=tenant.events,
        )
        started = live.build(EventKind.STARTED, {"session": session.to_json()})
        try:
            async with self._db.begin() as db:
                day = day_of(now, tenant.time_zone).isoformat()
                await repo.insert_session(
                    db,
                    session,
                    request_hash=spec.request_hash,
                    budget_day=day,
                    owner=self._leases.owner,
                    lease_until=self._leases.expiry(now),
                )
                await repo.insert_events(db, [started])
                # The reservation's UPDATE locks the tenant's window row until commit, so
                # the count below cannot race another admission of the same tenant; all
                # else is written before it, to hold that lock as briefly as possible.
                await reserve_for_session(
                    db, tenant, session_id=session.id, amount=spec.budget_usd, day=day, now=now
                )
                active = await repo.count_active(db, tenant.name)
                if active > tenant.max_concurrent_sessions:
                    raise QuotaExceeded(
                        "CONCURRENCY_LIMIT",
                        f"tenant:{tenant.name}:concurrent_sessions",
                        f"tenant {tenant.name!r} already runs its maximum of "
                        f"{tenant.max_concurrent_sessions} concurrent sessions; retry when one ends",
                    )
        except IntegrityError:
            await live.writer.close()
            if not spec.request_id:
                raise
            # A concurrent request with the same request_id won the unique constraint.
            earlier = await self._by_request_id(tenant, spec)
            if earlier is None:
                raise
            return earlier
        except BaseException:
            await live.writer.close()
            raise
        live.publish(started, persist=False)
        return Admission(session.id, self._queries.follow(tenant, session.id, 0), live)

    def _start(
        self, live: LiveSession, spec: SessionSpec, tenant: Tenant, warm: WarmAgent | None
    ) -> None:
        # The run task starts in the context the observer gives (its trace span current).
        session = live.session
        context = self._observer.admitted(session, spec.prompt)
        context.run(
            log.info,
            "session_start",
            extra={
                "session_id": session.id,
                "tenant": tenant.name,
                "model": session.model,
                "max_budget_usd": str(session.max_budget_usd),
                "max_turns": session.max_turns,
            },
        )
        self._lifecycle.launch(live, spec, tenant, warm, context)

    async def _resolve_resume(self, tenant: Tenant, spec: SessionSpec) -> SessionSpec:
        """Find the SDK conversation an earlier session of this tenant left behind."""
        try:
            earlier = await self._queries.get(tenant, spec.resume_session_id)
        except NotFound:
            raise NotFound(
                f"resume_session_id: session {spec.resume_session_id} not found"
            ) from None
        if not earlier.state.terminal:
            raise FailedPrecondition(
                f"resume_session_id: session {earlier.id} has not ended yet; resume it when it has"
            )
        transcripts = self._launcher.transcripts(tenant.name)
        if not earlier.sdk_session_id or not await transcripts.has(earlier.sdk_session_id):
            raise FailedPrecondition(
                f"resume_session_id: session {earlier.id} left no conversation to continue"
            )
        return replace(spec, resume_sdk_session_id=earlier.sdk_session_id)

    async def _by_request_id(self, tenant: Tenant, spec: SessionSpec) -> Admission | None:
        """The session that the spec's request_id started (None: none yet); InvalidArgument
        if that was a different request (another request hash)."""
        async with self._db() as db:
            found = await repo.find_by_request_id(db, tenant.name, spec.request_id)
        if found is None:
            return None
        session, earlier_hash = found
        if earlier_hash != spec.request_hash:
            raise InvalidArgument(
                "request_id",
                f"{spec.request_id} was already used for session {session.id} with a "
                "different request; use a new request_id for a new session",
            )
        return Admission(session.id, self._queries.follow(tenant, session.id, 0), None)

    async def _persist_events(self, events: Sequence[Event]) -> None:
        async with self._upkeep_db.begin() as db:
            await repo.insert_events(db, events)
