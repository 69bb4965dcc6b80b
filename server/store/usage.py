"""Usage aggregated in SQL over the sessions and tool_uses tables.

Functions take an AsyncSession and never commit: the caller owns the transaction.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import SessionState, Usage, usd
from .models import SessionRow, ToolUseRow


def _in_range(tenant: str, start: datetime | None, end: datetime) -> list[Any]:
    conditions = [SessionRow.tenant == tenant, SessionRow.created_at < end]
    if start is not None:
        conditions.append(SessionRow.created_at >= start)
    return conditions


async def usage(db: DbSession, tenant: str, start: datetime | None, end: datetime) -> Usage:
    """The tenant's sessions created in [start, end): counts by state and error reason,
    cost and turns; and their tool uses by tool name."""
    where = _in_range(tenant, start, end)
    rows = await db.execute(
        select(
            SessionRow.state,
            SessionRow.error_reason,
            func.count(),
            func.sum(SessionRow.cost_usd),
            func.sum(SessionRow.num_turns),
        )
        .where(*where)
        .group_by(SessionRow.state, SessionRow.error_reason)
    )
    total = succeeded = turns = 0
    cost = ended_cost = Decimal(0)
    failures: dict[str, int] = {}
    for state, reason, count, cost_sum, turns_sum in rows:
        group_cost = Decimal(cost_sum or 0)
        total += count
        cost += group_cost
        turns += int(turns_sum or 0)
        if state == SessionState.COMPLETE.value:
            succeeded += count
            ended_cost += group_cost
        elif state == SessionState.ERROR.value:
            key = reason or "UNKNOWN"
            failures[key] = failures.get(key, 0) + count
            ended_cost += group_cost
    tools = await db.execute(
        select(ToolUseRow.name, func.count())
        .join(SessionRow, SessionRow.id == ToolUseRow.session_id)
        .where(*where)
        .group_by(ToolUseRow.name)
    )
    return Usage(
        tenant=tenant,
        start=start,
        end=end,
        sessions_total=total,
        sessions_succeeded=succeeded,
        failures_by_reason=failures,
        total_cost_usd=usd(cost),
        ended_cost_usd=usd(ended_cost),
        total_turns=turns,
        tool_uses={name: int(count) for name, count in tools},
    )
