"""Repository of the webhooks' outbox: deliveries, their claims and their attempts.

A delivery is inserted in the transaction of the event it tells of, so it exists exactly
when the event does. A sender claims due deliveries (`FOR UPDATE SKIP LOCKED` on
PostgreSQL, so replicas never wait for each other's rows) for a lease; a claim whose lease
ran out (its replica died) is taken again. Functions take an AsyncSession and never
commit: the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import ColumnElement, and_, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from .models import (
    BudgetWindowRow,
    ReservationRow,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    table,
)
from .notify import notify

# Deliveries were written (payload: the tenant): the senders look for due ones at once.
WEBHOOKS_CHANNEL = "agentplane_webhooks"

PENDING = "PENDING"
DELIVERED = "DELIVERED"
FAILED = "FAILED"
STATES = (PENDING, DELIVERED, FAILED)


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to write: one event for one receiver."""

    id: str
    tenant: str
    event: str
    target: str
    url: str
    body: str
    created_at: datetime
    deadline: datetime
    session_id: str | None = None
    # Written once per key: a second delivery with the same key is dropped.
    dedupe_key: str | None = None


@dataclass(frozen=True)
class Attempt:
    """One attempt to send a delivery."""

    number: int
    started_at: datetime
    duration_ms: int
    status: int | None
    error: str
    sender: str


@dataclass(frozen=True)
class Delivery:
    """A delivery as the database holds it."""

    id: str
    tenant: str
    event: str
    target: str
    url: str
    session_id: str | None
    body: str
    state: str
    created_at: datetime
    deadline: datetime
    next_attempt_at: datetime
    attempts: int
    last_status: int | None
    last_error: str
    ended_at: datetime | None
    history: tuple[Attempt, ...] = field(default=())


def _delivery(row: WebhookDeliveryRow, history: Sequence[Attempt] = ()) -> Delivery:
    return Delivery(
        id=row.id,
        tenant=row.tenant,
        event=row.event,
        target=row.target,
        url=row.url,
        session_id=row.session_id,
        body=row.body,
        state=row.state,
        created_at=row.created_at,
        deadline=row.deadline,
        next_attempt_at=row.next_attempt_at,
        attempts=row.attempts,
        last_status=row.last_status,
        last_error=row.last_error,
        ended_at=row.ended_at,
        history=tuple(history),
    )


async def insert_deliveries(db: DbSession, deliveries: Sequence[NewDelivery]) -> None:
    """Write deliveries (those whose dedupe_key was written before are dropped) and tell
    the senders of every replica at commit."""
    if not deliveries:
        return
    dialect = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
    await db.execute(
        dialect.insert(WebhookDeliveryRow)
        .values(
            [
                {
                    "id": d.id,
                    "tenant": d.tenant,
                    "event": d.event,
                    "target": d.target,
                    "url": d.url,
                    "session_id": d.session_id,
                    "body": d.body,
                    "dedupe_key": d.dedupe_key,
                    "state": PENDING,
                    "created_at": d.created_at,
                    "deadline": d.deadline,
                    "next_attempt_at": d.created_at,
                    "attempts": 0,
                    "last_error": "",
                }
                for d in deliveries
            ]
        )
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
    )
    for tenant in sorted({d.tenant for d in deliveries}):
        await notify(db, WEBHOOKS_CHANNEL, tenant)


def _due(now: datetime) -> list[ColumnElement[bool]]:
    d = WebhookDeliveryRow
    return [
        d.state == PENDING,
        d.next_attempt_at <= now,
        or_(d.claim_expires_at.is_(None), d.claim_expires_at < now),
    ]


async def due_tenants(db: DbSession, now: datetime) -> list[str]:
    """The tenants with deliveries due now and not claimed."""
    rows = await db.scalars(select(WebhookDeliveryRow.tenant).where(*_due(now)).distinct())
    return list(rows)


async def claim(
    db: DbSession, *, tenant: str, owner: str, now: datetime, until: datetime, limit: int
) -> list[Delivery]:
    """Claim up to `limit` of the tenant's due deliveries for `owner` until `until`,
    oldest due first; rows another transaction holds are skipped, not waited for."""
    d = WebhookDeliveryRow
    ids = list(
        await db.scalars(
            select(d.id)
            .where(d.tenant == tenant, *_due(now))
            .order_by(d.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)  # nothing on SQLite: one server claims there
        )
    )
    if not ids:
        return []
    # The due conditions again: on SQLite another claim may have committed meanwhile.
    await db.execute(
        update(table(d))
        .where(d.id.in_(ids), *_due(now))
        .values(claimed_by=owner, claim_expires_at=until)
    )
    rows = await db.scalars(
        select(d).where(d.id.in_(ids), d.claimed_by == owner, d.claim_expires_at == until)
    )
    return [_delivery(row) for row in rows]


async def record_attempt(
    db: DbSession,
    delivery: Delivery,
    attempt: Attempt,
    *,
    state: str,
    next_attempt_at: datetime,
    ended_at: datetime | None,
) -> bool:
    """Keep an attempt and the delivery's state after it; the delivery changes only while
    `attempt.sender` still holds its claim (False otherwise: another replica took it)."""
    await db.execute(
        insert(table(WebhookAttemptRow)).values(
            delivery_id=delivery.id,
            number=attempt.number,
            started_at=attempt.started_at,
            duration_ms=attempt.duration_ms,
            status=attempt.status,
            error=attempt.error,
            sender=attempt.sender,
        )
    )
    d = WebhookDeliveryRow
    result = await db.execute(
        update(table(d))
        .where(d.id == delivery.id, d.claimed_by == attempt.sender, d.state == PENDING)
        .values(
            state=state,
            attempts=attempt.number,
            next_attempt_at=next_attempt_at,
            last_status=attempt.status,
            last_error=attempt.error,
            ended_at=ended_at,
            claimed_by=None,
            claim_expires_at=None,
        )
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def give_up(db: DbSession, delivery: Delivery, *, sender: str, at: datetime) -> bool:
    """Fail a delivery without another attempt (its retry window closed while it waited
    to be sent again), while `sender` still holds its claim."""
    d = WebhookDeliveryRow
    result = await db.execute(
        update(table(d))
        .where(d.id == delivery.id, d.claimed_by == sender, d.state == PENDING)
        .values(state=FAILED, ended_at=at, claimed_by=None, claim_expires_at=None)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def release(db: DbSession, owner: str) -> int:
    """Give up `owner`'s claims on deliveries not yet sent (a sender stopping): any
    replica may send them at once instead of after the lease. How many."""
    d = WebhookDeliveryRow
    result = await db.execute(
        update(table(d))
        .where(d.claimed_by == owner, d.state == PENDING)
        .values(claimed_by=None, claim_expires_at=None)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def delete_ended(db: DbSession, before: datetime, limit: int = 1000) -> int:
    """Delete up to `limit` deliveries delivered or given up before `before` (with their
    attempts); how many."""
    d = WebhookDeliveryRow
    ids = list(
        await db.scalars(select(d.id).where(d.state != PENDING, d.ended_at < before).limit(limit))
    )
    if not ids:
        return 0
    await db.execute(delete(table(WebhookAttemptRow)).where(WebhookAttemptRow.delivery_id.in_(ids)))
    await db.execute(delete(table(d)).where(d.id.in_(ids)))
    return len(ids)


async def attempt_number(db: DbSession, delivery_id: str) -> int:
    """The number the next attempt of a delivery takes (attempts recorded + 1): attempts
    of a replica that died before it recorded its delivery's state count too."""
    a = WebhookAttemptRow
    numbers = await db.scalars(select(a.number).where(a.delivery_id == delivery_id))
    return max(numbers, default=0) + 1


@dataclass(frozen=True)
class DeliveryFilter:
    """ListWebhookDeliveries filters."""

    session_id: str = ""
    state: str = ""
    event: str = ""


async def list_deliveries(
    db: DbSession,
    tenant: str,
    flt: DeliveryFilter,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[Delivery]:
    """The tenant's deliveries newest first (keyset-paginated after (created_at, id)),
    each with its attempts."""
    d = WebhookDeliveryRow
    query = select(d).where(d.tenant == tenant)
    if flt.session_id:
        query = query.where(d.session_id == flt.session_id)
    if flt.state:
        query = query.where(d.state == flt.state)
    if flt.event:
        query = query.where(d.event == flt.event)
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(d.created_at < created, and_(d.created_at == created, d.id < last_id))
        )
    rows = list(await db.scalars(query.order_by(d.created_at.desc(), d.id.desc()).limit(limit)))
    history: dict[str, list[Attempt]] = {row.id: [] for row in rows}
    if rows:
        a = WebhookAttemptRow
        for att in await db.scalars(
            select(a).where(a.delivery_id.in_(list(history))).order_by(a.number)
        ):
            history[att.delivery_id].append(
                Attempt(
                    att.number,
                    att.started_at,
                    att.duration_ms,
                    att.status,
                    att.error,
                    att.sender,
                )
            )
    return [_delivery(row, history[row.id]) for row in rows]


@dataclass(frozen=True)
class WindowTotals:
    """A budget window's day, limit and totals."""

    day: str
    limit_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal


async def session_window(db: DbSession, session_id: str) -> WindowTotals | None:
    """The budget window a session's reservation was taken from, as `db` sees it now."""
    w, r = BudgetWindowRow, ReservationRow
    row = (
        await db.execute(
            select(w.day, w.limit_usd, w.spent_usd, w.reserved_usd)
            .join(r, and_(r.tenant == w.tenant, r.day == w.day))
            .where(r.session_id == session_id)
        )
    ).first()
    if row is None:
        return None
    return WindowTotals(row.day, row.limit_usd, row.spent_usd, row.reserved_usd)
