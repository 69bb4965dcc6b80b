"""Admission: a RunSession becomes a session, or is refused with nothing created.

In order: the request is checked against the tenant's policy, a resume is resolved, a
repeated request_id re-attaches to the session it started, the server must be ready and
have room. Then a short transaction holds the session's budget in the tenant's day window
and counts it among the tenant's active sessions (one conditional UPDATE: exact on any
number of replicas, and the window's row locked only until that commit), and another
inserts the session (IDLE) with its `started` event; if that fails, the hold is undone.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..domain import Event, EventKind, Session, SessionState, utcnow
from ..errors import (
    AgentplaneError,
    DatabaseUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unavailable,
)
from ..mcp.cli_config import session_servers
from ..mcp.servers import problem as mcp_problem
from ..money.ledger import confirm_hold, holds_request, release_hold, reserve_for_session
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

# How long a repeat of a request waits for a concurrent one's session to be written.
EARLIER_POLLS, EARLIER_POLL_S = 100, 0.05


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
            self._lifecycle.launch(live, spec, tenant, warm)
        assert admission is not None
        return admission

    async def _insert(self, tenant: Tenant, spec: SessionSpec, warm: WarmAgent | None) -> Admission:
        """The admission's writes (`write_admission`), with the id of `warm` (a warm agent
        made for it) or a new one. A request_id that a concurrent request won re-attaches to
        its session."""
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
            await write_admission(
                self._db,
                tenant,
                session,
                started,
                request_hash=spec.request_hash,
                leases=self._leases,
            )
        except IntegrityError:
            await live.writer.close()
            if not spec.request_id:
                raise
            # A concurrent request with the same request_id won the unique constraint (of
            # its hold, or of its session): re-attach to its session once written.
            earlier = await self._by_request_id(tenant, spec, wait=True)
            if earlier is None:
                raise Unavailable(
                    f"request_id: a concurrent request with {spec.request_id} was not "
                    "admitted; retry"
                ) from None
            return earlier
        except BaseException:
            await live.writer.close()
            raise
        live.publish(started, persist=False)
        return Admission(session.id, self._queries.follow(tenant, session.id, 0), live)

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

    async def _by_request_id(
        self, tenant: Tenant, spec: SessionSpec, *, wait: bool = False
    ) -> Admission | None:
        """The session that the spec's request_id started (None: none yet); with `wait`,
        a concurrent admission of it is awaited until it wrote its session or let its hold
        go. InvalidArgument if that was a different request (another request hash)."""
        found = None
        for _ in range(EARLIER_POLLS if wait else 1):
            async with self._db() as db:
                # The hold first: an admission writes its session only while it holds.
                held = wait and await holds_request(db, tenant.name, spec.request_id)
                found = await repo.find_by_request_id(db, tenant.name, spec.request_id)
            if found is not None or not held:
                break
            await asyncio.sleep(EARLIER_POLL_S)
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


async def write_admission(
    db: async_sessionmaker[DbSession],
    tenant: Tenant,
    session: Session,
    started: Event,
    *,
    request_hash: str,
    leases: LeaseConfig,
) -> None:
    """What admitting `session` writes: first its hold (the budget check and hold, and the
    count of the tenant's active sessions, in a transaction of their own, so the window's
    row is locked from the hold's conditional UPDATE to that commit only and a tenant's
    admissions do not queue behind each other's writes), then the session (IDLE) with its
    `started` event, owned by `leases.owner`. Raises QuotaExceeded (nothing written), or
    what writing the session raised (the hold undone)."""
    now = session.create_time
    day = day_of(now, tenant.time_zone).isoformat()
    async with db.begin() as s:
        # Notified with the session's writes, not here: on PostgreSQL every commit that
        # notifies takes one lock of the whole database, so an admission takes it once.
        await reserve_for_session(
            s,
            tenant,
            session_id=session.id,
            amount=session.max_budget_usd,
            day=day,
            now=now,
            announce=False,
            request_id=session.request_id or None,  # none: never collides
        )
    try:
        async with db.begin() as s:
            if not await confirm_hold(s, tenant, session.id, day):
                raise Unavailable("the admission took too long and its hold was released")
            await repo.insert_session(
                s,
                session,
                request_hash=request_hash,
                budget_day=day,
                owner=leases.owner,
                lease_until=leases.expiry(now),
            )
            await repo.insert_events(s, [started])
    except BaseException:
        await asyncio.shield(_release(db, session.id))
        raise


async def _release(db: async_sessionmaker[DbSession], session_id: str) -> None:
    """Undo the hold of an admission that failed after it (never a hold leaked: what this
    cannot undo, with the database away, crash recovery releases later)."""
    try:
        async with db.begin() as s:
            await release_hold(s, session_id)
    except (DBAPIError, DatabaseUnavailable) as exc:
        log.error(
            "releasing the hold of a failed admission (%s) failed (%s); crash recovery releases it",
            session_id,
            type(exc).__name__,
        )
