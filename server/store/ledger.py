"""Repository of budget windows and reservations: the atomic money moves.

Each function is one step of a transaction the caller owns. The conditional UPDATE in
`reserve` is what makes concurrent admissions safe on any number of replicas: the check
and the hold are one statement, so two sessions can never both pass a check only one
should pass. It locks the tenant's window row until commit, so its transaction is kept
to that (the admission's own writes come after, in another; see `sessions/admission.py`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.sql.elements import ColumnElement

from .models import BudgetWindowRow, ReservationRow, SessionRow, table
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
    max_holds: int | None = None,
    announce: bool = True,
    request_id: str | None = None,
) -> bool:
    """Hold `amount` in the window if spent + reserved + amount stays within `limit` and,
    with `max_holds`, the tenant's reservations still held (its active sessions) stay
    within it, counting this one.

    The configured limit is written on every reservation, so a changed tenants file
    takes effect on the next admission. Returns False when the window cannot cover the
    amount (or the holds are at their maximum); the caller must then roll back (the
    reservation row is already written). `announce`: notify the window's change at this
    commit (else the caller notifies it, see `announce`). `request_id`: the admission's;
    a hold of the same tenant and request_id raises IntegrityError.
    """
    await _ensure_window(db, tenant, day, limit)
    # All else is written before the window's UPDATE, which locks its row until commit:
    # the caller's transaction is rolled back when the window cannot cover it (and the
    # notification with it: it is sent at commit).
    await db.execute(
        insert(table(ReservationRow)).values(
            session_id=session_id,
            tenant=tenant,
            day=day,
            amount_usd=amount,
            status=HELD,
            created_at=now,
            request_id=request_id,
        )
    )
    if announce:
        await notify(db, BUDGET_CHANNEL, f"{tenant} {day}")
    w = BudgetWindowRow
    checks = [w.tenant == tenant, w.day == day, w.spent_usd + w.reserved_usd + amount <= limit]
    if max_holds is not None:
        # Other days' holds only ever go down (a window admits on its own day): read
        # before the lock, they can only make the check stricter than it need be.
        others = await db.scalar(
            select(func.coalesce(func.sum(w.holds), 0)).where(w.tenant == tenant, w.day != day)
        )
        checks.append(w.holds + int(others or 0) < max_holds)
    result = await db.execute(
        update(table(w))
        .where(*checks)
        .values(reserved_usd=w.reserved_usd + amount, holds=w.holds + 1, limit_usd=limit)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def announce(db: DbSession, tenant: str, day: str) -> None:
    """Notify a window's change at the commit of `db`'s transaction."""
    await notify(db, BUDGET_CHANNEL, f"{tenant} {day}")


def _is_held(session_id: str) -> tuple[ColumnElement[bool], ...]:
    """The conditions of a session's reservation while HELD."""
    return (ReservationRow.session_id == session_id, ReservationRow.status == HELD)


async def _held(db: DbSession, session_id: str) -> ReservationRow | None:
    """A session's reservation, while HELD."""
    held: ReservationRow | None = await db.scalar(
        select(ReservationRow).where(*_is_held(session_id))
    )
    return held


async def confirm(db: DbSession, session_id: str) -> bool:
    """Whether a session's hold is still HELD, locking it until commit: the admission's
    writes check it, so a hold released meanwhile (see `orphans`) admits nothing."""
    result = await db.execute(
        update(table(ReservationRow)).where(*_is_held(session_id)).values(status=HELD)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def release(db: DbSession, session_id: str) -> bool:
    """Undo a hold that admitted nothing: its row deleted, the window given back what it
    held (exactly once: False when it was not HELD)."""
    held = await _held(db, session_id)
    if held is None:
        return False
    gone = await db.execute(delete(table(ReservationRow)).where(*_is_held(session_id)))
    if gone.rowcount != 1:  # type: ignore[attr-defined]
        return False
    w = BudgetWindowRow
    await db.execute(
        update(table(w))
        .where(w.tenant == held.tenant, w.day == held.day)
        .values(reserved_usd=w.reserved_usd - held.amount_usd, holds=w.holds - 1)
    )
    await notify(db, BUDGET_CHANNEL, f"{held.tenant} {held.day}")
    return True


async def orphans(db: DbSession, *, older_than: datetime, limit: int = 100) -> list[str]:
    """Sessions ids of holds taken before `older_than` whose session was never written
    (its admission died between the hold and its own writes)."""
    r = ReservationRow
    ids = await db.scalars(
        select(r.session_id)
        .where(
            r.status == HELD,
            r.created_at < older_than,
            ~exists().where(SessionRow.id == r.session_id),
        )
        .limit(limit)
    )
    return list(ids)


async def holds_request(db: DbSession, tenant: str, request_id: str) -> bool:
    """Whether a hold of this tenant's request_id is HELD (its admission may be writing)."""
    r = ReservationRow
    return bool(
        await db.scalar(
            select(exists().where(r.tenant == tenant, r.request_id == request_id, r.status == HELD))
        )
    )


async def has_session(db: DbSession, session_id: str) -> bool:
    return bool(await db.scalar(select(exists().where(SessionRow.id == session_id))))


ORPHAN_AFTER = timedelta(minutes=10)  # far beyond any admission's own writes


async def settle(db: DbSession, *, session_id: str, actual: Decimal, now: datetime) -> bool:
    """Release a session's hold and add its actual cost to the window it was taken from.

    Exactly once: a second call finds the reservation SETTLED and changes nothing.
    """
    held = await _held(db, session_id)
    if held is None:
        return False
    claimed = await db.execute(
        update(table(ReservationRow))
        .where(*_is_held(session_id))
        .values(status=SETTLED, actual_usd=actual, settled_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return False
    w = BudgetWindowRow
    await db.execute(
        update(table(w))
        .where(w.tenant == held.tenant, w.day == held.day)
        .values(
            reserved_usd=w.reserved_usd - held.amount_usd,
            spent_usd=w.spent_usd + actual,
            holds=w.holds - 1,
        )
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
    held = await _held(db, session_id)
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
        .where(*_is_held(session_id))
        .values(amount_usd=ReservationRow.amount_usd + amount)
    )
    await notify(db, BUDGET_CHANNEL, f"{held.tenant} {held.day}")
    return True
