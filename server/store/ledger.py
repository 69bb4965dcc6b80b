"""Repository of budget windows and reservations: the atomic money moves.

Each function is one step of a transaction the caller owns. The conditional UPDATE in
`reserve` is what makes concurrent admissions safe on any number of replicas: the check
and the hold are one statement, so two sessions can never both pass a check only one
should pass.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from .models import BudgetWindowRow, ReservationRow, table
from .notify import BUDGET_CHANNEL, notify

HELD = "HELD"
SETTLED = "SETTLED"


async def _ensure_window(db: DbSession, tenant: str, day: str, limit: Decimal) -> None:
    dialect = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
    await db.execute(
        dialect.insert(BudgetWindowRow)
        .values(tenant=tenant, day=day, limit_usd=limit, spent_usd=0, reserved_usd=0)
        .on_conflict_do_nothing()
    )


async def reserve(
    db: DbSession,
    *,
    session_id: str,
    tenant: str,
    day: str,
    limit: Decimal,
    amount: Decimal,
    now: datetime,
) -> bool:
    """Hold `amount` in the window if spent + reserved + amount stays within `limit`.

    The configured limit is written on every reservation, so a changed tenants file
    takes effect on the next admission. Returns False when the window cannot cover the
    amount; the caller must then roll back (the reservation row is already written).
    """
    await _ensure_window(db, tenant, day, limit)
    # The hold is written before the window's UPDATE, which locks the row until commit:
    # the caller's transaction is rolled back when the window cannot cover it.
    await db.execute(
        insert(table(ReservationRow)).values(
            session_id=session_id,
            tenant=tenant,
            day=day,
            amount_usd=amount,
            status=HELD,
            created_at=now,
        )
    )
    w = BudgetWindowRow
    result = await db.execute(
        update(table(w))
        .where(
            w.tenant == tenant,
            w.day == day,
            w.spent_usd + w.reserved_usd + amount <= limit,
        )
        .values(reserved_usd=w.reserved_usd + amount, limit_usd=limit)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await notify(db, BUDGET_CHANNEL, f"{tenant} {day}")
    return True


async def settle(db: DbSession, *, session_id: str, actual: Decimal, now: datetime) -> bool:
    """Release a session's hold and add its actual cost to the window it was taken from.

    Exactly once: a second call finds the reservation SETTLED and changes nothing.
    """
    held = await db.scalar(
        select(ReservationRow).where(
            ReservationRow.session_id == session_id, ReservationRow.status == HELD
        )
    )
    if held is None:
        return False
    claimed = await db.execute(
        update(table(ReservationRow))
        .where(ReservationRow.session_id == session_id, ReservationRow.status == HELD)
        .values(status=SETTLED, actual_usd=actual, settled_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return False
    w = BudgetWindowRow
    await db.execute(
        update(table(w))
        .where(w.tenant == held.tenant, w.day == held.day)
        .values(reserved_usd=w.reserved_usd - held.amount_usd, spent_usd=w.spent_usd + actual)
    )
    await notify(db, BUDGET_CHANNEL, f"{held.tenant} {held.day}")
    return True


async def get_window(db: DbSession, tenant: str, day: str) -> BudgetWindowRow | None:
    return await db.scalar(
        select(BudgetWindowRow).where(BudgetWindowRow.tenant == tenant, BudgetWindowRow.day == day)
    )


async def window_totals(conn: AsyncConnection, tenant: str, day: str) -> tuple[Decimal, Decimal]:
    """(spent, reserved) of a window, zero if none; on a bare connection (no ORM session),
    the cheapest read there is, for GetBudget."""
    w = table(BudgetWindowRow)
    row = (
        await conn.execute(
            select(w.c.spent_usd, w.c.reserved_usd).where(w.c.tenant == tenant, w.c.day == day)
        )
    ).first()
    return (row.spent_usd, row.reserved_usd) if row else (Decimal(0), Decimal(0))


async def raise_hold(db: DbSession, *, session_id: str, amount: Decimal, limit: Decimal) -> bool:
    """Add `amount` to a session's held reservation if its window (the day it was taken
    from) covers it within `limit`; one conditional UPDATE, like `reserve`. False when the
    window cannot cover it, or the session holds nothing (it was settled)."""
    held = await db.scalar(
        select(ReservationRow).where(
            ReservationRow.session_id == session_id, ReservationRow.status == HELD
        )
    )
    if held is None:
        return False
    w = BudgetWindowRow
    result = await db.execute(
        update(table(w))
        .where(
            w.tenant == held.tenant,
            w.day == held.day,
            w.spent_usd + w.reserved_usd + amount <= limit,
        )
        .values(reserved_usd=w.reserved_usd + amount, limit_usd=limit)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await db.execute(
        update(table(ReservationRow))
        .where(ReservationRow.session_id == session_id, ReservationRow.status == HELD)
        .values(amount_usd=ReservationRow.amount_usd + amount)
    )
    await notify(db, BUDGET_CHANNEL, f"{held.tenant} {held.day}")
    return True
