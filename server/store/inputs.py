"""Repository of sessions' input requests (caller tool calls, approvals, questions).

A request is inserted when the session asks; it is settled once, by whichever comes
first: the caller's answer (Respond, on any replica), its deadline, or the session's end.
Functions take an AsyncSession and never commit: the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import Decider, InputAnswer, InputKind, InputRequest
from .models import SessionInputRow, table
from .notify import INPUTS_CHANNEL, notify


@dataclass(frozen=True)
class StoredInput:
    """An input request as the database holds it: settled once `answer` is set."""

    request: InputRequest
    answer: InputAnswer | None
    resolved_at: datetime | None


def _request(row: SessionInputRow) -> InputRequest:
    return InputRequest(
        id=row.id,
        session_id=row.session_id,
        kind=InputKind(row.kind),
        tool_name=row.tool_name,
        tool_use_id=row.tool_use_id,
        input=dict(row.input),
        created_at=row.created_at,
        deadline=row.deadline,
    )


def _stored(row: SessionInputRow) -> StoredInput:
    answer = None
    if row.resolved_at is not None:
        answer = InputAnswer(
            Decider(row.decided_by or Decider.SESSION_END.value),
            row.outcome or "",
            row.message or "",
            dict(row.answer or {}),
        )
    return StoredInput(_request(row), answer, row.resolved_at)


async def insert_request(db: DbSession, request: InputRequest) -> None:
    await db.execute(
        insert(table(SessionInputRow)),
        [
            {
                "id": request.id,
                "session_id": request.session_id,
                "kind": request.kind.value,
                "tool_name": request.tool_name,
                "tool_use_id": request.tool_use_id,
                "input": request.input,
                "created_at": request.created_at,
                "deadline": request.deadline,
            }
        ],
    )


async def get_input(db: DbSession, session_id: str, request_id: str) -> StoredInput | None:
    row = await db.scalar(
        select(SessionInputRow).where(
            SessionInputRow.id == request_id, SessionInputRow.session_id == session_id
        )
    )
    return _stored(row) if row is not None else None


async def settle(
    db: DbSession, request: InputRequest, answer: InputAnswer, *, at: datetime
) -> bool:
    """Record `answer` unless the request was settled before (False then); a caller's
    answer past the deadline is refused too. Tells the session's owner (NOTIFY)."""
    query = update(SessionInputRow).where(
        SessionInputRow.id == request.id, SessionInputRow.resolved_at.is_(None)
    )
    if answer.decided_by is Decider.CALLER:
        query = query.where(SessionInputRow.deadline > at)
    result = await db.execute(
        query.values(
            resolved_at=at,
            decided_by=answer.decided_by.value,
            outcome=answer.outcome,
            message=answer.message,
            answer=answer.value,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await notify(db, INPUTS_CHANNEL, f"{request.session_id} {request.id}")
    return True


async def pending(db: DbSession, session_ids: Sequence[str]) -> dict[str, list[InputRequest]]:
    """The unsettled requests of these sessions, oldest first."""
    if not session_ids:
        return {}
    rows = await db.scalars(
        select(SessionInputRow)
        .where(SessionInputRow.session_id.in_(session_ids), SessionInputRow.resolved_at.is_(None))
        .order_by(SessionInputRow.created_at, SessionInputRow.id)
    )
    found: dict[str, list[InputRequest]] = {}
    for row in rows:
        found.setdefault(row.session_id, []).append(_request(row))
    return found


async def settle_all(db: DbSession, session_id: str, *, at: datetime, message: str) -> None:
    """Settle every request the session still has open: it has ended."""
    await db.execute(
        update(SessionInputRow)
        .where(SessionInputRow.session_id == session_id, SessionInputRow.resolved_at.is_(None))
        .values(
            resolved_at=at,
            decided_by=Decider.SESSION_END.value,
            outcome="ended",
            message=message,
            answer={},
        )
    )
