"""The metered model requests of sessions (the audit trail of what was charged)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import TokenUsage
from .models import ModelRequestInFlightRow, ModelRequestRow

INTERRUPTED = "interrupted"  # the outcome of a request its server died during


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
    # The gateway's id of the request (its pending record's key; "" if it had none).
    request_id: str = ""


@dataclass(frozen=True)
class PendingRequest:
    """A model request about to be forwarded: what a crash would leave unsettled."""

    request_id: str
    session_id: str
    model: str
    estimate_usd: Decimal
    started_at: datetime
    replica: str


async def insert_pending(db: DbSession, pending: Sequence[PendingRequest]) -> None:
    if not pending:
        return
    await db.execute(
        insert(ModelRequestInFlightRow),
        [
            {
                "request_id": p.request_id,
                "session_id": p.session_id,
                "model": p.model[:128],
                "estimate_usd": p.estimate_usd,
                "started_at": p.started_at,
                "replica": p.replica[:64],
            }
            for p in pending
        ],
    )


async def settle_records(db: DbSession, records: Sequence[ModelRequestRecord]) -> None:
    """Write settled requests in place of their pending records (in `db`'s transaction)."""
    await insert_records(db, records)
    await drop_pending(db, [r.request_id for r in records if r.request_id])


async def pending_of(db: DbSession, session_id: str) -> list[PendingRequest]:
    """A session's pending records: its requests forwarded and not settled."""
    rows = await db.scalars(
        select(ModelRequestInFlightRow)
        .where(ModelRequestInFlightRow.session_id == session_id)
        .order_by(ModelRequestInFlightRow.started_at)
    )
    return [
        PendingRequest(r.request_id, r.session_id, r.model, r.estimate_usd, r.started_at, r.replica)
        for r in rows
    ]


async def drop_pending(db: DbSession, request_ids: Sequence[str]) -> None:
    if request_ids:
        await db.execute(
            delete(ModelRequestInFlightRow).where(
                ModelRequestInFlightRow.request_id.in_(request_ids)
            )
        )


def interrupted(tenant: str, pending: PendingRequest, at: datetime) -> ModelRequestRecord:
    """The settled record of a request its server died during: charged its estimate."""
    return ModelRequestRecord(
        session_id=pending.session_id,
        tenant=tenant,
        started_at=pending.started_at,
        ended_at=at,
        model=pending.model,
        outcome=INTERRUPTED,
        status=None,
        usage=TokenUsage(),
        cost_usd=pending.estimate_usd,
        request_id=pending.request_id,
    )


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
