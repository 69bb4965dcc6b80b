"""Repository of sessions, their labels, events and tool uses.

Functions take an AsyncSession and never commit: the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import and_, bindparam, delete, exists, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import (
    BudgetPause,
    ErrorReason,
    Event,
    EventKind,
    PauseReason,
    Session,
    SessionState,
    TokenUsage,
    server_tool_counts,
)
from .models import (
    EventRow,
    ReservationRow,
    SessionInputRow,
    SessionLabelRow,
    SessionRow,
    ToolUseRow,
    TranscriptEntryRow,
    TranscriptRow,
    table,
)
from .notify import EVENTS_CHANNEL, notify
from .transcripts import project_key


def _to_domain(row: SessionRow) -> Session:
    return Session(
        id=row.id,
        tenant=row.tenant,
        state=SessionState(row.state),
        create_time=row.created_at,
        max_budget_usd=row.max_budget_usd,
        max_turns=row.max_turns,
        allowed_tools=tuple(row.allowed_tools),
        model=row.model,
        labels=dict(row.labels),
        request_id=row.request_id or "",
        start_time=row.started_at,
        end_time=row.ended_at,
        cost_usd=row.cost_usd,
        sdk_cost_usd=row.sdk_cost_usd,
        shortfall_usd=row.shortfall_usd,
        num_turns=row.num_turns,
        usage=TokenUsage(
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            cache_creation_input_tokens=row.cache_creation_input_tokens,
            cache_read_input_tokens=row.cache_read_input_tokens,
            server_tool_use=server_tool_counts(row.server_tool_use),
        ),
        error_reason=ErrorReason(row.error_reason) if row.error_reason else None,
        error_message=row.error_message,
        sdk_session_id=row.sdk_session_id,
        result=row.result,
        resumed_from=row.resumed_from or "",
        caller_tools=tuple(row.caller_tools or ()),
        require_approval=tuple(row.require_approval or ()),
        output_schema=row.output_schema or "",
        structured_result=row.structured_result,
        trace_id=row.trace_id or "",
        trace_span_id=row.trace_span_id or "",
        callback_url=row.callback_url or "",
        paused=_pause_of(row),
    )


def _pause_of(row: SessionRow) -> BudgetPause | None:
    if row.pause_reason is None or row.paused_at is None or row.pause_deadline is None:
        return None
    if row.state != SessionState.RUNNING.value:
        return None
    return BudgetPause(
        PauseReason(row.pause_reason), row.paused_at, row.pause_deadline, row.pending_budget_usd
    )


def _pause_columns(pause: BudgetPause | None) -> dict[str, object]:
    return {
        "pause_reason": pause.reason.value if pause is not None else None,
        "paused_at": pause.since if pause is not None else None,
        "pause_deadline": pause.deadline if pause is not None else None,
        "pending_budget_usd": pause.pending_usd if pause is not None else None,
    }


async def save_pause(db: DbSession, session_id: str, pause: BudgetPause | None) -> None:
    """Record a running session's pause at its budget (None: it is not paused)."""
    await db.execute(
        update(table(SessionRow))
        .where(SessionRow.id == session_id, SessionRow.state == SessionState.RUNNING.value)
        .values(**_pause_columns(pause))
    )


async def set_budget(db: DbSession, session_id: str, *, before: Decimal, after: Decimal) -> bool:
    """Raise an active session's budget from `before` to `after` (and drop a raise that
    waited for the day's window); False when it ended or its budget is no longer `before`
    (a concurrent raise: read it again)."""
    active = [SessionState.IDLE.value, SessionState.RUNNING.value]
    result = await db.execute(
        update(table(SessionRow))
        .where(
            SessionRow.id == session_id,
            SessionRow.state.in_(active),
            SessionRow.max_budget_usd == before,
        )
        .values(max_budget_usd=after, pending_budget_usd=None)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def budget_of(db: DbSession, session_id: str) -> Decimal | None:
    """A session's budget as stored (None: no such session)."""
    budget: Decimal | None = await db.scalar(
        select(SessionRow.max_budget_usd).where(SessionRow.id == session_id)
    )
    return budget


async def set_pending_budget(db: DbSession, session_id: str, amount: Decimal) -> bool:
    """Keep a raise the day's window cannot cover on a paused session, for a raised daily
    limit to apply (reason DAILY_LIMIT); False when it is not paused."""
    result = await db.execute(
        update(table(SessionRow))
        .where(
            SessionRow.id == session_id,
            SessionRow.state == SessionState.RUNNING.value,
            SessionRow.paused_at.is_not(None),
        )
        .values(pending_budget_usd=amount, pause_reason=PauseReason.DAILY_LIMIT.value)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _outcome_columns(session: Session) -> dict[str, object]:
    """The columns that change as a session runs and ends."""
    return {
        "state": session.state.value,
        "model": session.model,
        "started_at": session.start_time,
        "ended_at": session.end_time,
        "cost_usd": session.cost_usd,
        "sdk_cost_usd": session.sdk_cost_usd,
        "shortfall_usd": session.shortfall_usd,
        "num_turns": session.num_turns,
        "input_tokens": session.usage.input_tokens,
        "output_tokens": session.usage.output_tokens,
        "cache_creation_input_tokens": session.usage.cache_creation_input_tokens,
        "cache_read_input_tokens": session.usage.cache_read_input_tokens,
        "server_tool_use": dict(session.usage.server_tool_use) or None,
        "error_reason": session.error_reason.value if session.error_reason else None,
        "error_message": session.error_message,
        "sdk_session_id": session.sdk_session_id,
        "result": session.result,
        "structured_result": session.structured_result,
        # A session's end (or its recovery) ends its pause.
        **(_pause_columns(None) if session.state.terminal else {}),
    }


async def insert_session(
    db: DbSession,
    session: Session,
    *,
    request_hash: str,
    budget_day: str,
    owner: str | None = None,
    lease_until: datetime | None = None,
) -> None:
    # Core statements, not the ORM's unit of work: they cost a fraction of its CPU.
    await db.execute(
        insert(table(SessionRow)),
        [
            {
                "id": session.id,
                "tenant": session.tenant,
                "created_at": session.create_time,
                "request_id": session.request_id or None,
                "request_hash": request_hash,
                "model": session.model,
                "allowed_tools": list(session.allowed_tools),
                "labels": dict(session.labels),
                "max_budget_usd": session.max_budget_usd,
                "max_turns": session.max_turns,
                "budget_day": budget_day,
                "resumed_from": session.resumed_from or None,
                "caller_tools": list(session.caller_tools) or None,
                "require_approval": list(session.require_approval) or None,
                "output_schema": session.output_schema or None,
                "trace_id": session.trace_id or None,
                "trace_span_id": session.trace_span_id or None,
                "callback_url": session.callback_url or None,
                "owner": owner,
                "lease_expires_at": lease_until,
                **_outcome_columns(session),
            }
        ],
    )
    if session.labels:
        await db.execute(
            insert(table(SessionLabelRow)),
            [{"session_id": session.id, "key": k, "value": v} for k, v in session.labels.items()],
        )


async def get_session(db: DbSession, tenant: str, session_id: str) -> Session | None:
    row = await db.scalar(
        select(SessionRow).where(SessionRow.id == session_id, SessionRow.tenant == tenant)
    )
    return _to_domain(row) if row else None


async def get_state(db: DbSession, tenant: str, session_id: str) -> SessionState | None:
    """Only a session's state (what a follower checks before each read of its events)."""
    state = await db.scalar(
        select(SessionRow.state).where(SessionRow.id == session_id, SessionRow.tenant == tenant)
    )
    return SessionState(state) if state is not None else None


async def find_by_request_id(
    db: DbSession, tenant: str, request_id: str
) -> tuple[Session, str] | None:
    """The session a request_id started, with the fingerprint of that request."""
    row = await db.scalar(
        select(SessionRow).where(SessionRow.tenant == tenant, SessionRow.request_id == request_id)
    )
    return (_to_domain(row), row.request_hash) if row else None


async def save_progress(
    db: DbSession,
    session: Session,
    *,
    expect: SessionState,
    lease_expired_by: datetime | None = None,
) -> bool:
    """Write a session's state and outcome if it is still in state `expect` (and, with
    `lease_expired_by`, only if its lease expired before then: a recovering server must
    not close a session whose owner renewed its lease since it looked).

    The guard makes terminal states final even when two writers race (a cancel and a
    natural end, say): the loser sees False and changes nothing.
    """
    guard = [SessionRow.id == session.id, SessionRow.state == expect.value]
    if lease_expired_by is not None:
        guard.append(
            or_(
                SessionRow.lease_expires_at.is_(None),
                SessionRow.lease_expires_at < lease_expired_by,
            )
        )
    result = await db.execute(
        update(table(SessionRow)).where(*guard).values(**_outcome_columns(session))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def renew_leases(
    db: DbSession, *, owner: str, ids: Sequence[str], until: datetime
) -> set[str]:
    """Extend the leases of these sessions if still active and ours; the ids kept."""
    active = [SessionState.IDLE.value, SessionState.RUNNING.value]
    await db.execute(
        update(table(SessionRow))
        .where(SessionRow.id.in_(ids), SessionRow.owner == owner, SessionRow.state.in_(active))
        .values(lease_expires_at=until)
    )
    kept = await db.scalars(
        select(SessionRow.id).where(
            SessionRow.id.in_(ids), SessionRow.owner == owner, SessionRow.state.in_(active)
        )
    )
    return set(kept)


async def request_cancel(db: DbSession, session_id: str, *, at: datetime) -> bool:
    """Flag an active session for its owner to cancel; False if it is no longer active."""
    active = [SessionState.IDLE.value, SessionState.RUNNING.value]
    result = await db.execute(
        update(table(SessionRow))
        .where(SessionRow.id == session_id, SessionRow.state.in_(active))
        .values(cancel_requested_at=func.coalesce(SessionRow.cancel_requested_at, at))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def cancel_requested(db: DbSession, ids: Sequence[str]) -> set[str]:
    """Those of these sessions that another replica asked to cancel."""
    flagged = await db.scalars(
        select(SessionRow.id).where(
            SessionRow.id.in_(ids), SessionRow.cancel_requested_at.is_not(None)
        )
    )
    return set(flagged)


async def expired_sessions(db: DbSession, *, now: datetime, limit: int = 100) -> list[Session]:
    """Active sessions whose owner's lease ran out."""
    rows = await db.scalars(
        select(SessionRow)
        .where(
            SessionRow.state.in_([SessionState.IDLE.value, SessionState.RUNNING.value]),
            or_(SessionRow.lease_expires_at.is_(None), SessionRow.lease_expires_at < now),
        )
        .limit(limit)
    )
    return [_to_domain(row) for row in rows]


async def last_seq(db: DbSession, session_id: str) -> int:
    seq = await db.scalar(select(func.max(EventRow.seq)).where(EventRow.session_id == session_id))
    return int(seq or 0)


@dataclass(frozen=True)
class SessionFilter:
    """ListSessions filters."""

    state: SessionState | None = None
    created_from: datetime | None = None
    created_before: datetime | None = None
    labels: tuple[tuple[str, str], ...] = ()
    # Only sessions with an unsettled input request.
    awaiting: bool = False
    # Only sessions paused at their budget.
    paused: bool = False


async def list_sessions(
    db: DbSession,
    tenant: str,
    flt: SessionFilter,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[Session]:
    """Sessions newest first, keyset-paginated after (created_at, id) of the last one seen."""
    query = select(SessionRow).where(SessionRow.tenant == tenant)
    if flt.state is not None:
        query = query.where(SessionRow.state == flt.state.value)
    if flt.created_from is not None:
        query = query.where(SessionRow.created_at >= flt.created_from)
    if flt.created_before is not None:
        query = query.where(SessionRow.created_at < flt.created_before)
    for key, value in flt.labels:
        query = query.where(
            exists().where(
                SessionLabelRow.session_id == SessionRow.id,
                SessionLabelRow.key == key,
                SessionLabelRow.value == value,
            )
        )
    if flt.awaiting:
        query = query.where(
            exists().where(
                SessionInputRow.session_id == SessionRow.id, SessionInputRow.resolved_at.is_(None)
            )
        )
    if flt.paused:
        query = query.where(
            SessionRow.state == SessionState.RUNNING.value, SessionRow.paused_at.is_not(None)
        )
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(
                SessionRow.created_at < created,
                and_(SessionRow.created_at == created, SessionRow.id < last_id),
            )
        )
    query = query.order_by(SessionRow.created_at.desc(), SessionRow.id.desc()).limit(limit)
    return [_to_domain(row) for row in (await db.scalars(query)).all()]


async def insert_events(db: DbSession, events: Sequence[Event]) -> None:
    """Insert a batch of events (one executemany) and record its tool uses."""
    if not events:
        return
    await db.execute(
        insert(table(EventRow)),
        [
            {
                "session_id": e.session_id,
                "seq": e.seq,
                "time": e.time,
                "kind": e.kind.value,
                "payload": e.data,
            }
            for e in events
        ],
    )
    await _record_tool_uses(db, events)
    # Followers on other replicas read the new events when told (at this commit).
    last: dict[str, int] = {}
    for e in events:
        last[e.session_id] = max(e.seq, last.get(e.session_id, 0))
    for session_id, seq in last.items():
        await notify(db, EVENTS_CHANNEL, f"{session_id} {seq}")


async def _record_tool_uses(db: DbSession, events: Sequence[Event]) -> None:
    uses = [
        {
            "session_id": e.session_id,
            "tool_use_id": e.data["tool_use_id"],
            "name": e.data["name"],
            "started_at": e.time,
        }
        for e in events
        if e.kind is EventKind.TOOL_USE
    ]
    ends = [
        {
            "sid": e.session_id,
            "tid": e.data["tool_use_id"],
            "end": e.time,
            "err": bool(e.data["is_error"]),
        }
        for e in events
        if e.kind is EventKind.TOOL_RESULT
    ]
    if uses:  # first: a result may end a use of the same batch
        await db.execute(insert(table(ToolUseRow)), uses)
    if ends:
        tools = table(ToolUseRow)
        await db.execute(
            update(tools)
            .where(tools.c.session_id == bindparam("sid"), tools.c.tool_use_id == bindparam("tid"))
            .values(ended_at=bindparam("end"), is_error=bindparam("err")),
            ends,
        )


async def list_events(
    db: DbSession, session_id: str, *, after_seq: int = 0, up_to: int | None = None
) -> list[Event]:
    """A session's events after `after_seq` (and up to `up_to`, when given), in order."""
    query = select(EventRow).where(EventRow.session_id == session_id, EventRow.seq > after_seq)
    if up_to is not None:
        query = query.where(EventRow.seq <= up_to)
    rows = await db.scalars(query.order_by(EventRow.seq))
    return [
        Event(
            session_id=r.session_id, seq=r.seq, time=r.time, kind=EventKind(r.kind), data=r.payload
        )
        for r in rows
    ]


async def delete_session(db: DbSession, session: Session) -> bool:
    """Delete an ended session and all that hangs off it (events, labels, tool uses,
    metered requests, input requests, artifacts: by cascade), and its transcript unless
    another session of the tenant continues the same conversation. False if it was gone
    or not ended (then nothing is deleted)."""
    deleted = await db.execute(
        delete(SessionRow).where(
            SessionRow.id == session.id,
            SessionRow.tenant == session.tenant,
            SessionRow.state.in_([SessionState.COMPLETE.value, SessionState.ERROR.value]),
        )
    )
    if deleted.rowcount != 1:  # type: ignore[attr-defined]
        return False
    # Its settled reservation (no foreign key: a hold is taken before its session exists).
    await db.execute(delete(ReservationRow).where(ReservationRow.session_id == session.id))
    conversation = session.sdk_session_id
    if conversation and not await db.scalar(
        select(
            exists().where(
                SessionRow.tenant == session.tenant, SessionRow.sdk_session_id == conversation
            )
        )
    ):
        for model in (TranscriptEntryRow, TranscriptRow):
            await db.execute(
                delete(model).where(
                    model.project_key == project_key(session.tenant),
                    model.session_id == conversation,
                )
            )
    return True


async def ended_before(db: DbSession, tenant: str, before: datetime, limit: int) -> list[Session]:
    """Up to `limit` of the tenant's sessions that ended before `before` (retention)."""
    rows = await db.scalars(
        select(SessionRow)
        .where(
            SessionRow.tenant == tenant,
            SessionRow.ended_at < before,
            SessionRow.state.in_([SessionState.COMPLETE.value, SessionState.ERROR.value]),
        )
        .order_by(SessionRow.ended_at)
        .limit(limit)
    )
    return [_to_domain(row) for row in rows]
