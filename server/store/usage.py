"""Usage aggregated in SQL over the sessions, tool_uses and model_requests tables.

Functions take an AsyncSession and never commit: the caller owns the transaction.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import ModelUsage, SessionState, TokenUsage, Usage, server_tool_counts, usd
from .models import ModelRequestRow, SessionRow, ToolUseRow


def _in_range(tenant: str, start: datetime | None, end: datetime) -> list[Any]:
    conditions = [SessionRow.tenant == tenant, SessionRow.created_at < end]
    if start is not None:
        conditions.append(SessionRow.created_at >= start)
    return conditions


async def usage(db: DbSession, tenant: str, start: datetime | None, end: datetime) -> Usage:
    """The tenant's sessions created in [start, end): counts by state and error reason,
    cost, turns and metering shortfalls; their tool uses by tool name; and the tenant's
    model requests that ended in [start, end), by model (see `by_model`)."""
    where = _in_range(tenant, start, end)
    rows = await db.execute(
        select(
            SessionRow.state,
            SessionRow.error_reason,
            func.count(),
            func.sum(SessionRow.cost_usd),
            func.sum(SessionRow.num_turns),
            func.sum(case((SessionRow.shortfall_usd > 0, 1), else_=0)),
            func.sum(SessionRow.shortfall_usd),
        )
        .where(*where)
        .group_by(SessionRow.state, SessionRow.error_reason)
    )
    total = succeeded = turns = short = 0
    cost = ended_cost = shortfall = Decimal(0)
    failures: dict[str, int] = {}
    for state, reason, count, cost_sum, turns_sum, short_count, short_sum in rows:
        group_cost = Decimal(cost_sum or 0)
        total += count
        cost += group_cost
        turns += int(turns_sum or 0)
        short += int(short_count or 0)
        shortfall += Decimal(short_sum or 0)
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
        models=await by_model(db, tenant, start, end),
        sessions_short=short,
        shortfall_usd=usd(shortfall),
    )


async def by_model(
    db: DbSession, tenant: str, start: datetime | None, end: datetime
) -> tuple[ModelUsage, ...]:
    """The tenant's model requests that ended in [start, end), per model (sorted by model
    id): counts by outcome, tokens by kind, server-tool uses and cost. By `ended_at`, as a
    request is charged when it settles; the index on (tenant, ended_at) serves the range.
    Server-tool uses are JSON per request, summed here (only the few requests with any)."""
    conditions = [ModelRequestRow.tenant == tenant, ModelRequestRow.ended_at < end]
    if start is not None:
        conditions.append(ModelRequestRow.ended_at >= start)
    rows = await db.execute(
        select(
            ModelRequestRow.model,
            ModelRequestRow.outcome,
            func.count(),
            func.sum(ModelRequestRow.input_tokens),
            func.sum(ModelRequestRow.output_tokens),
            func.sum(ModelRequestRow.cache_creation_input_tokens),
            func.sum(ModelRequestRow.cache_read_input_tokens),
            func.sum(ModelRequestRow.cost_usd),
        )
        .where(*conditions)
        .group_by(ModelRequestRow.model, ModelRequestRow.outcome)
    )
    outcomes: dict[str, dict[str, int]] = {}
    tokens: dict[str, TokenUsage] = {}
    costs: dict[str, Decimal] = {}
    for model, outcome, count, inputs, outputs, cache_writes, cache_reads, cost_sum in rows:
        outcomes.setdefault(model, {})[outcome] = int(count)
        group = TokenUsage(
            int(inputs or 0), int(outputs or 0), int(cache_writes or 0), int(cache_reads or 0)
        )
        tokens[model] = tokens.get(model, TokenUsage()).plus(group)
        costs[model] = costs.get(model, Decimal(0)) + Decimal(cost_sum or 0)
    uses = await db.execute(
        select(ModelRequestRow.model, ModelRequestRow.server_tool_use).where(
            *conditions, ModelRequestRow.server_tool_use.is_not(None)
        )
    )
    for model, counts in uses:
        tokens[model] = tokens[model].plus(TokenUsage(server_tool_use=server_tool_counts(counts)))
    # Sorted here, not in SQL: the databases' collations order strings differently.
    return tuple(
        ModelUsage(model, outcomes[model], tokens[model], usd(costs[model]))
        for model in sorted(outcomes)
    )
