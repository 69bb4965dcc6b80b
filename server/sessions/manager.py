"""Admission, the registry of live sessions, and the queries over recorded ones."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from decimal import Decimal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..budgets.ledger import reserve_for_session, settle_session
from ..budgets.windows import day_of
from ..domain import ErrorReason, Event, EventKind, Session, SessionState, utcnow
from ..errors import InvalidArgument, NotFound, Unavailable
from ..store import sessions as repo
from ..store.sessions import SessionFilter
from ..tenants import Tenant
from .live import EventWriter, LiveSession
from .requests import RunRequest, SessionSpec, validate
from .runner import AgentRunner, Outcome
from .translate import Verdict

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class SessionManager:
    """Starts sessions and answers for them; the use-cases own their transactions."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        runner: AgentRunner,
        *,
        not_ready: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._db = db
        self._runner = runner
        self._not_ready = not_ready
        self._live: dict[str, LiveSession] = {}

    # -- running -------------------------------------------------------------------------

    async def start(self, tenant: Tenant, request: RunRequest) -> LiveSession:
        """Admit a session (persist it IDLE and reserve its budget, atomically) and start it.

        Raises InvalidArgument, QuotaExceeded or Unavailable; then nothing is created.
        """
        spec = validate(request, tenant)
        problem = self._not_ready()
        if problem:
            raise Unavailable(problem)
        now = utcnow()
        session = Session(
            id=str(uuid.uuid4()),
            tenant=tenant.name,
            state=SessionState.IDLE,
            create_time=now,
            max_budget_usd=spec.budget_usd,
            max_turns=spec.max_turns,
            allowed_tools=spec.tools,
            model=spec.model,
            labels=spec.labels,
            request_id=spec.request_id,
        )
        live = LiveSession(session, EventWriter(self._persist_events))
        started = live.build(EventKind.STARTED, {"session": session.to_json()})
        try:
            async with self._db.begin() as db:
                day = day_of(now, tenant.time_zone).isoformat()
                await repo.insert_session(
                    db, session, request_hash=spec.fingerprint(), budget_day=day
                )
                await reserve_for_session(
                    db, tenant, session_id=session.id, amount=spec.budget_usd, day=day, now=now
                )
                await repo.insert_events(db, [started])
        except IntegrityError:
            await live.writer.close()
            if not spec.request_id:
                raise
            # Until idempotent re-attach lands, a repeated request_id is refused clearly.
            raise InvalidArgument(
                "request_id", f"{spec.request_id} was already used for another session"
            ) from None
        except BaseException:
            await live.writer.close()
            raise
        live.publish(started, persist=False)
        self._live[session.id] = live
        live.task = asyncio.create_task(self._run(live, spec, tenant), name=f"session-{session.id}")
        log.info("session_start session_id=%s tenant=%s", session.id, tenant.name)
        return live

    async def _run(self, live: LiveSession, spec: SessionSpec, tenant: Tenant) -> None:
        try:
            running = live.session.evolve(state=SessionState.RUNNING, start_time=utcnow())
            async with self._db.begin() as db:
                await repo.save_progress(db, running, expect=SessionState.IDLE)
            live.session = running
            live.emit(
                EventKind.STATE_CHANGE,
                {"from_state": SessionState.IDLE.value, "to_state": SessionState.RUNNING.value},
            )
            outcome = await self._runner.run(live, spec, tenant)
        except asyncio.CancelledError:
            reason = live.cancel_reason or ErrorReason.CANCELLED
            message = {
                ErrorReason.SHUTDOWN: "the server shut down before the session ended",
            }.get(reason, "the session was cancelled")
            await asyncio.shield(
                self._finish(live, Outcome(Verdict(SessionState.ERROR, reason, message)))
            )
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
            cost_usd=Decimal(outcome.cost_usd),
            sdk_cost_usd=Decimal(outcome.cost_usd),
            num_turns=outcome.num_turns,
            usage=outcome.usage,
            sdk_session_id=outcome.sdk_session_id,
            result=outcome.result if v.state is SessionState.COMPLETE else "",
        )
        result = live.build(EventKind.RESULT, {"session": final.to_json()})
        await live.writer.close()
        try:
            async with self._db.begin() as db:
                await repo.save_progress(db, final, expect=live.session.state)
                await settle_session(db, session_id=final.id, actual=final.cost_usd, now=now)
                await repo.insert_events(db, [result])
        except Exception:
            log.exception("recording the end of session %s failed", final.id)
        live.session = final
        live.publish(result, persist=False)
        live.end()
        self._live.pop(live.id, None)
        log.info(
            "session_%s session_id=%s tenant=%s reason=%s cost_usd=%s",
            "complete" if final.state is SessionState.COMPLETE else "error",
            final.id, final.tenant, final.error_reason or "", final.cost_usd,
        )

    async def _persist_events(self, events: Sequence[Event]) -> None:
        async with self._db.begin() as db:
            await repo.insert_events(db, events)

    def cancel_on_disconnect(self, live: LiveSession) -> None:
        """The RunSession caller went away: cancel unless it asked to continue."""
        if live.task is not None and not live.task.done():
            live.cancel_reason = ErrorReason.CANCELLED
            live.task.cancel()

    async def shutdown(self) -> None:
        """Interrupt every live session, recording it ERROR/SHUTDOWN."""
        tasks = []
        for live in list(self._live.values()):
            if live.task is not None and not live.task.done():
                live.cancel_reason = ErrorReason.SHUTDOWN
                live.task.cancel()
                tasks.append(live.task)
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def live_count(self) -> int:
        return len(self._live)

    # -- queries -------------------------------------------------------------------------

    async def get(self, tenant: Tenant, session_id: str) -> Session:
        """A session of this tenant; another tenant's is NotFound, exactly like a missing one."""
        if not session_id:
            raise InvalidArgument("session_id", "must not be empty")
        async with self._db() as db:
            session = await repo.get_session(db, tenant.name, session_id)
        if session is None:
            raise NotFound(f"session {session_id} not found")
        return session

    async def events(self, tenant: Tenant, session_id: str) -> list[Event]:
        """The persisted events of a session of this tenant."""
        await self.get(tenant, session_id)
        async with self._db() as db:
            return await repo.list_events(db, session_id)

    async def follow(self, live: LiveSession, after_seq: int = 0) -> AsyncIterator[Event]:
        async for event in live.follow(after_seq):
            yield event

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
