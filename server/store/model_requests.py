"""The metered model requests of sessions (the audit trail of what was charged)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import TokenUsage
from .models import ModelRequestRow


@dataclass(frozen=True)
class ModelRequestRecord:
    """One settled model request, in plain values."""

    session_id: str
    tenant: str
    started_at: datetime
    ended_at: datetime
    model: str
    outcome: str
    status: int | None
    usage: TokenUsage
    cost_usd: Decimal
    price_version: str = ""
    upstream_request_id: str = ""


async def insert_records(db: DbSession, records: Sequence[ModelRequestRecord]) -> None:
    if not records:
        return
    await db.execute(
        insert(ModelRequestRow),
        [
            {
                "session_id": r.session_id,
                "tenant": r.tenant,
                "started_at": r.started_at,
                "ended_at": r.ended_at,
                "model": r.model[:128],
                "outcome": r.outcome[:32],
                "status": r.status,
                "input_tokens": r.usage.input_tokens,
                "output_tokens": r.usage.output_tokens,
                "cache_creation_input_tokens": r.usage.cache_creation_input_tokens,
                "cache_read_input_tokens": r.usage.cache_read_input_tokens,
                "server_tool_use": dict(r.usage.server_tool_use) or None,
                "cost_usd": r.cost_usd,
                "price_version": r.price_version[:32],
                "upstream_request_id": r.upstream_request_id[:128],
            }
            for r in records
        ],
    )
