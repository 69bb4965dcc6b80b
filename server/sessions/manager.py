"""Admission, the registry of live sessions, and the queries over recorded ones."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..budgets.ledger import reserve_for_session, settle_session
from ..budgets.windows import day_of
from ..coalesce import Coalescer
from ..domain import ErrorReason, Event, EventKind, Session, SessionState, usd, utcnow
from ..errors import (
    AgentplaneError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unavailable,
)
from ..store import sessions as repo
from ..store.sessions import SessionFilter
from ..tenants import Tenant
from .leases import LeaseConfig, LeaseKeeper
from .live import EventWriter, LiveSession
from .observer import NullObserver, SessionObserver, rejection_reason
from .pool import WarmPool
from .requests import RunRequest, SessionSpec, validate
from .runner import AgentRunner, Outcome, WarmAgent
from .translate import Verdict

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Ended sessions kept in memory for GetSession (an ended session never changes again).
ENDED_CACHE_SIZE = 4096
ENDED_CACHE_MAX_RESULT_CHARS = 65536


@dataclass
class Admission:
    """An admitted (or re-attached) session and its event stream."""

    session_id: str
    events: AsyncIterator[Event]
    live: LiveSession | None


class SessionManager:
    """Starts sessions and answers for them; the use-cases own their transactions."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        runner: AgentRunner,
        *,
        not_ready: Callable[[], str | None] = lambda: None,
        max_sessions: int = 8,
        leases: LeaseConfig | None = None,
        finish_retry_s: float = 60.0,
        observer: SessionObserver | None = None,
    ) -> None:
        self._db = db
        self._observer: SessionObserver = observer or NullObserver()
        self._runner = runner
        self._not_ready = not_ready
        self._max_sessions = max_sessions
        self._admitting = 0
        self._live: dict[str, LiveSession] = {}
        self.poll_interval_s = 0.25
        self.draining = False
        self.leases = leases or LeaseConfig(owner=f"agentplane-{uuid.uuid4().hex[:12]}")
        self.lease_keeper = LeaseKeeper(
            db, self.leases, self._live.keys, self._lost, self._runner.clean_up
        )
        self._finish_retry_s = finish_retry_s
        # Set by the app when a tenant has a warm pool (see pool.py).
        self.pool: WarmPool | None = None
        self._ended: OrderedDict[str, Session] = OrderedDict()
        self._reads: Coalescer[Session | None] = Coalescer()

    @property
    def room(self) -> int:
        """How many more sessions this server would admit now."""
        return self._max_sessions - len(self._live) - self._admitting

    # -- running -------------------------------------------------------------------------

    async def start(self, tenant: Tenant, request: RunRequest) -> Admission:
        """Admit a session (persist it IDLE and reserve its budget, atomically) and start it.

        A repeat of a request_id re-attaches to the session it started instead. Raises
        InvalidArgument, QuotaExceeded or Unavailable; then nothing is created.
        """
        try:
            return await self._start(tenant, request)
        except AgentplaneError as exc:
            reason = rejection_reason(exc)
            self._observer.rejected(tenant.name, reason)
            detail = {"detail": str(exc)} if isinstance(exc, QuotaExceeded) else {}
            log.info("budget_rejected" if reason == "BUDGET_EXCEEDED" else "admission_rejected",
                     extra={"tenant": tenant.name, "reason": reason, **detail})
            raise

    async def _start(self, tenant: Tenant, request: RunRequest) -> Admission:
        spec = validate(request, tenant)
        self._runner.check_model(spec.model)
        if spec.resume_session_id:
            spec = await self._resolve_resume(tenant, spec)
        if spec.request_id:
            earlier = await self._by_request_id(tenant, spec)
            if earlier is not None:
                return earlier
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        problem = self._not_ready()
        if problem:
            raise Unavailable(problem)
        if not tenant.api_key():
            raise FailedPrecondition(
                f"tenant {tenant.name!r} has no Anthropic API key: set the environment "
                f"variable {tenant.anthropic_api_key_env} for the server"
            )
        if len(self._live) + self._admitting >= self._max_sessions:
            raise QuotaExceeded(
                "CONCURRENCY_LIMIT",
                "server:max_sessions",
                f"this server already runs its maximum of {self._max_sessions} sessions "
                "(AGENTPLANE_MAX_SESSIONS); retry later or on another replica",
            )
        self._admitting += 1
        try:
            return await self._admit(tenant, spec)
        finally:
            self._admitting -= 1

    async def _admit(self, tenant: Tenant, spec: SessionSpec) -> Admission:
        pool = self.pool
        warm = pool.take(tenant, spec) if pool is not None else None
        admitted = None
        try:
            admission = await self._admit_as(tenant, spec, warm)
            admitted = admission.session_id
            if pool is not None and admission.live is not None:
                pool.served(tenant.name, hit=warm is not None and admitted == warm.session_id)
            return admission
        finally:
            if pool is not None and warm is not None and admitted != warm.session_id:
                pool.give_back(warm)  # not admitted (or a repeat): the agent is still unused

    async def _admit_as(
        self, tenant: Tenant, spec: SessionSpec, warm: WarmAgent | None
    ) -> Admission:
        """Admit with the id of `warm` (a warm agent made for it) or a new one."""
        now = utcnow()
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
        )
        live = LiveSession(session, EventWriter(self._persist_events), self._observer.event)
        live.writer.on_overflow = lambda: live.request_cancel(
            ErrorReason.DATABASE_UNAVAILABLE,
            "the database was unreachable for longer than the session's event buffer lasts",
        )
        started = live.build(EventKind.STARTED, {"session": session.to_json()})
        try:
            async with self._db.begin() as db:
                day = day_of(now, tenant.time_zone).isoformat()
                await repo.insert_session(
                    db, session, request_hash=spec.fingerprint(), budget_day=day,
                    owner=self.leases.owner, lease_until=self.leases.expiry(now),
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
        # The run task starts in the context the observer gives (its trace span current).
        run_context = self._observer.admitted(session, spec.prompt)
        run_context.run(log.info, "session_start", extra={
            "session_id": session.id, "tenant": tenant.name, "model": session.model,
            "max_budget_usd": str(session.max_budget_usd), "max_turns": session.max_turns,
        })
        live.publish(started, persist=False)
        self._live[session.id] = live
        live.task = asyncio.create_task(
            self._run(live, spec, tenant, warm), name=f"session-{session.id}", context=run_context
        )
        return Admission(session.id, self._follow(tenant, session.id, 0), live)

    async def _resolve_resume(self, tenant: Tenant, spec: SessionSpec) -> SessionSpec:
        """Find the SDK conversation an earlier session of this tenant left behind."""
        try:
            earlier = await self.get(tenant, spec.resume_session_id)
        except NotFound:
            raise NotFound(
                f"resume_session_id: session {spec.resume_session_id} not found"
            ) from None
        if not earlier.state.terminal:
            raise FailedPrecondition(
                f"resume_session_id: session {earlier.id} has not ended yet; resume it when it has"
            )
        transcripts = self._runner.transcripts(tenant.name)
        if not earlier.sdk_session_id or not await transcripts.has(earlier.sdk_session_id):
            raise FailedPrecondition(
                f"resume_session_id: session {earlier.id} left no conversation to continue"
            )
        return replace(spec, resume_sdk_session_id=earlier.sdk_session_id)

    async def _by_request_id(self, tenant: Tenant, spec: SessionSpec) -> Admission | None:
        async with self._db() as db:
            found = await repo.find_by_request_id(db, tenant.name, spec.request_id)
        if found is None:
            return None
        session, fingerprint = found
        if fingerprint != spec.fingerprint():
            raise InvalidArgument(
                "request_id",
                f"{spec.request_id} was already used for session {session.id} with a "
                "different request; use a new request_id for a new session",
            )
        return Admission(session.id, self._follow(tenant, session.id, 0), None)

    async def _run(
        self, live: LiveSession, spec: SessionSpec, tenant: Tenant, warm: WarmAgent | None
    ) -> None:
        try:
            if live.cancel_requested.is_set():  # cancelled while IDLE: never start
                if warm is not None:
                    await self._runner.discard(warm)
                outcome = Outcome(
                    Verdict(SessionState.ERROR, live.cancel_reason, live.cancel_message)
                )
            else:
                running = live.session.evolve(state=SessionState.RUNNING, start_time=utcnow())
                async with self._db.begin() as db:
                    await repo.save_progress(db, running, expect=SessionState.IDLE)
                live.session = running
                live.emit(
                    EventKind.STATE_CHANGE,
                    {"from_state": SessionState.IDLE.value, "to_state": SessionState.RUNNING.value},
                )
                outcome = await self._runner.run(
                    live, spec, tenant,
                    lambda request: self._observer.model_request(live.session, request),
                    warm,
                )
        except asyncio.CancelledError:
            # Cancelled from outside (event loop shutdown): still record the end.
            live.request_cancel(ErrorReason.SHUTDOWN)
            if warm is not None:  # harmless if the runner already closed it
                await asyncio.shield(self._runner.discard(warm))
            verdict = Verdict(SessionState.ERROR, live.cancel_reason, live.cancel_message)
            await asyncio.shield(self._finish(live, Outcome(verdict)))
            raise
        except Exception as exc:  # a bug of ours must still end the session and settle
            log.exception("session %s failed", live.id)
            outcome = Outcome(
                Verdict(SessionState.ERROR, ErrorReason.AGENT_FAILED, f"internal error: {exc}")
            )
        await self._finish(live, outcome)

    async def _finish(self, live: LiveSession, outcome: Outcome) -> None:
        """Persist the terminal state, settle the reservation and publish the result, in one
        transaction after every earlier event is written."""
        now = utcnow()
        v = outcome.verdict
        final = live.session.evolve(
            state=v.state,
            end_time=now,
            error_reason=v.reason,
            error_message=v.message,
            cost_usd=usd(outcome.cost_usd),
            sdk_cost_usd=usd(outcome.sdk_total_usd or outcome.cost_usd),
            num_turns=outcome.num_turns,
            usage=outcome.usage,
            sdk_session_id=outcome.sdk_session_id,
            result=outcome.result if v.state is SessionState.COMPLETE else "",
        )
        result = live.build(EventKind.RESULT, {"session": final.to_json()})
        recorded = await self._record_end(live, final, result)
        live.session = final
        if recorded:  # else the database holds another end: `get` must read it there
            self._remember(final)
        live.publish(result, persist=False)
        live.end()
        self._live.pop(live.id, None)
        log.info(
            "session_complete" if final.state is SessionState.COMPLETE else "session_error",
            extra={
                "session_id": final.id, "tenant": final.tenant,
                "reason": final.error_reason.value if final.error_reason else None,
                "detail": final.error_message[:500] or None,
                "cost_usd": str(final.cost_usd), "num_turns": final.num_turns,
            },
        )

    async def _record_end(self, live: LiveSession, final: Session, result: Event) -> bool:
        """Write the remaining events, then the terminal state, the settlement and the
        result event in one transaction. While the database is down this is retried for
        `finish_retry_s`; after that the session is left to crash recovery (its lease is
        no longer renewed once it leaves the registry). True if `final` was recorded."""
        deadline = asyncio.get_running_loop().time() + self._finish_retry_s
        delay = 0.2
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                if not await live.writer.close(timeout=max(remaining, 0.0)):
                    raise TimeoutError("events still unwritten")
                async with self._db.begin() as db:
                    if not await repo.save_progress(db, final, expect=live.session.state):
                        log.warning("session %s was closed by another server meanwhile", final.id)
                        return False
                    await settle_session(db, session_id=final.id, actual=final.cost_usd, now=final.end_time or utcnow())
                    await repo.insert_events(db, [result])
                return True
            except (DBAPIError, Unavailable, TimeoutError) as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    live.writer.abort()
                    log.error("recording the end of session %s failed for good (%s); crash "
                              "recovery will close it", final.id, type(exc).__name__)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _lost(self, session_id: str) -> None:
        """Another server closed a session we still run (we were cut off): stop it."""
        live = self._live.get(session_id)
        if live is not None:
            live.request_cancel(
                ErrorReason.INTERRUPTED, "another server closed the session while it was cut off"
            )

    async def drain(self, grace_s: float, force: asyncio.Event | None = None) -> None:
        """Refuse new sessions, give running ones `grace_s` to finish (or until `force` is
        set), then interrupt the rest (ERROR/SHUTDOWN, settled)."""
        self.draining = True
        lives = list(self._live.values())
        if lives:
            done = asyncio.ensure_future(asyncio.gather(*(lv.finished.wait() for lv in lives)))
            waiters: set[asyncio.Future[Any]] = {done}
            if force is not None:
                waiters.add(asyncio.ensure_future(force.wait()))
            await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        await self.shutdown()

    async def _persist_events(self, events: Sequence[Event]) -> None:
        async with self._db.begin() as db:
            await repo.insert_events(db, events)

    def cancel_on_disconnect(self, admission: Admission) -> None:
        """The RunSession caller went away: cancel the session it started."""
        if admission.live is not None:
            admission.live.request_cancel(ErrorReason.CANCELLED)

    async def cancel(self, tenant: Tenant, session_id: str) -> Session:
        """Cancel a session: an IDLE one never starts, a RUNNING one is interrupted.

        Returns the session in its terminal state; FailedPrecondition if it had ended.
        """
        session = await self.get(tenant, session_id)
        if session.state.terminal:
            raise FailedPrecondition(
                f"session {session_id} has already ended ({session.state.value}); "
                "only IDLE or RUNNING sessions can be cancelled"
            )
        live = self._live.get(session_id)
        if live is None:
            raise FailedPrecondition(
                f"session {session_id} is not running on this server; cancel it on its owner"
            )
        live.request_cancel(ErrorReason.CANCELLED)
        await live.finished.wait()
        return live.session

    async def shutdown(self) -> None:
        """Interrupt every live session, recording it ERROR/SHUTDOWN."""
        lives = list(self._live.values())
        for live in lives:
            live.request_cancel(ErrorReason.SHUTDOWN)
        await asyncio.gather(*(live.finished.wait() for live in lives))

    @property
    def live_count(self) -> int:
        return len(self._live)

    # -- queries -------------------------------------------------------------------------

    async def get(self, tenant: Tenant, session_id: str) -> Session:
        """A session of this tenant; another tenant's is NotFound, exactly like a missing one.

        Sessions running here and recently ended ones are answered from memory: a running
        session's record is written by this server alone, and an ended one never changes.
        """
        if not session_id:
            raise InvalidArgument("session_id", "must not be empty")
        live = self._live.get(session_id)
        known = live.session if live is not None else self._ended.get(session_id)
        if known is not None and known.tenant == tenant.name:
            return known
        # Concurrent calls for one session (callers polling it) share a read.
        session = await self._reads.get(
            (tenant.name, session_id), lambda: self._read(tenant.name, session_id)
        )
        if session is None:
            raise NotFound(f"session {session_id} not found")
        self._remember(session)
        return session

    async def _read(self, tenant: str, session_id: str) -> Session | None:
        async with self._db() as db:
            return await repo.get_session(db, tenant, session_id)

    def _remember(self, session: Session) -> None:
        """Keep an ended session for `get` (least recently ended ones go first)."""
        if not session.state.terminal or len(session.result) > ENDED_CACHE_MAX_RESULT_CHARS:
            return
        self._ended[session.id] = session
        self._ended.move_to_end(session.id)
        while len(self._ended) > ENDED_CACHE_SIZE:
            self._ended.popitem(last=False)

    async def events(self, tenant: Tenant, session_id: str) -> list[Event]:
        """The persisted events of a session of this tenant."""
        await self.get(tenant, session_id)
        async with self._db() as db:
            return await repo.list_events(db, session_id)

    async def stream(self, tenant: Tenant, session_id: str, after_seq: int) -> AsyncIterator[Event]:
        """A session's events after `after_seq`: persisted ones, then live ones to the end."""
        if after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        await self.get(tenant, session_id)
        return self._follow(tenant, session_id, after_seq)

    async def _follow(self, tenant: Tenant, session_id: str, after_seq: int) -> AsyncIterator[Event]:
        last = after_seq
        while True:
            live = self._live.get(session_id)
            if live is not None:  # in memory from seq 1: switching over leaves no gap
                async for event in live.follow(last):
                    yield event
                return
            async with self._db() as db:
                events = await repo.list_events(db, session_id, after_seq=last)
                session = await repo.get_session(db, tenant.name, session_id)
            for event in events:
                yield event
                last = event.seq
                if event.kind is EventKind.RESULT:
                    return
            if session is None or (session.state.terminal and not events):
                return
            # Running on another server (or between admission and registration here).
            await asyncio.sleep(self.poll_interval_s)

    async def list(
        self, tenant: Tenant, flt: SessionFilter, *, page_size: int, page_token: str
    ) -> tuple[list[Session], str]:
        """One page of the tenant's sessions, newest first, and the next page's token."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        if (
            flt.created_from is not None
            and flt.created_before is not None
            and flt.created_from >= flt.created_before
        ):
            raise InvalidArgument("create_time_end", "must be after create_time_start")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token, flt) if page_token else None
        async with self._db() as db:
            rows = await repo.list_sessions(db, tenant.name, flt, after=after, limit=size + 1)
        page, more = rows[:size], len(rows) > size
        token = _encode_token(page[-1].create_time, page[-1].id, flt) if more else ""
        return page, token


def _filter_digest(flt: SessionFilter) -> str:
    body = json.dumps(
        [
            flt.state.value if flt.state else None,
            flt.created_from.isoformat() if flt.created_from else None,
            flt.created_before.isoformat() if flt.created_before else None,
            sorted(flt.labels),
        ]
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _encode_token(created: datetime, session_id: str, flt: SessionFilter) -> str:
    """An opaque cursor: the position after the last session shown, bound to the filters."""
    body = json.dumps({"c": created.isoformat(), "i": session_id, "f": _filter_digest(flt)})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_token(token: str, flt: SessionFilter) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        created, session_id, digest = datetime.fromisoformat(body["c"]), body["i"], body["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
    if digest != _filter_digest(flt):
        raise InvalidArgument("page_token", "was issued for different filters")
    return created, str(session_id)
