"""Reserve at admission, settle at the end: the tenant's daily spend, kept in the database."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..coalesce import Coalescer
from ..domain import BudgetWindow
from ..errors import QuotaExceeded
from ..store import ledger as repo
from ..store.engine import bus_of
from ..store.notify import BUDGET_CHANNEL
from ..store.outages import database_outages
from ..tenants import Tenant
from .windows import day_of, window_bounds

# Windows whose totals are kept in memory (tenants x days asked for), at most.
MAX_KNOWN = 4096


async def reserve_for_session(
    db: DbSession,
    tenant: Tenant,
    *,
    session_id: str,
    amount: Decimal,
    day: str,
    now: datetime,
    announce: bool = True,
    request_id: str | None = None,
) -> None:
    """Hold a session's maximum cost in the window of `day`, counting it among the
    tenant's active sessions; raises QuotaExceeded (BUDGET_EXCEEDED, or CONCURRENCY_LIMIT
    when the tenant already runs its maximum), then `db`'s transaction must be rolled back.

    The window's row stays locked until `db` commits: admission commits this alone, at
    once, and writes the session after (see `sessions/admission.py`). `announce` False:
    the change is notified by the caller's next transaction (`confirm_hold`).
    `request_id`: the admission's; a concurrent repeat's hold raises IntegrityError.
    """
    held = await repo.reserve(
        db,
        session_id=session_id,
        tenant=tenant.name,
        day=day,
        limit=tenant.daily_limit_usd,
        amount=amount,
        now=now,
        max_holds=tenant.max_concurrent_sessions,
        announce=announce,
        request_id=request_id,
    )
    if held:
        return
    window = await repo.get_window(db, tenant.name, day)
    # Against the tenant's limit now: the row keeps the limit of its last hold, which a
    # reload may have lowered since (the refused UPDATE wrote nothing).
    limit = tenant.daily_limit_usd
    remaining = limit - window.spent_usd - window.reserved_usd if window else amount
    if remaining >= amount:  # the window covers it: the holds are at their maximum
        raise QuotaExceeded(
            "CONCURRENCY_LIMIT",
            f"tenant:{tenant.name}:concurrent_sessions",
            f"tenant {tenant.name!r} already runs its maximum of "
            f"{tenant.max_concurrent_sessions} concurrent sessions; retry when one ends",
        )
    raise QuotaExceeded(
        "BUDGET_EXCEEDED",
        f"tenant:{tenant.name}:daily_usd",
        f"the daily budget of tenant {tenant.name!r} cannot cover this session: "
        f"it needs {amount} USD, {max(remaining, Decimal(0))} USD of "
        f"{tenant.daily_limit_usd} USD remain for {day}; ask for a smaller "
        "max_budget_usd or wait for the next window",
    )


async def settle_session(db: DbSession, *, session_id: str, actual: Decimal, now: datetime) -> bool:
    """Release the session's hold and record its actual cost (exactly once)."""
    return await repo.settle(db, session_id=session_id, actual=actual, now=now)


async def release_hold(db: DbSession, session_id: str) -> bool:
    """Undo the hold of an admission that failed after it (its compensation)."""
    return await repo.release(db, session_id)


async def confirm_hold(db: DbSession, tenant: Tenant, session_id: str, day: str) -> bool:
    """In the admission's transaction: whether its hold still stands (locked till commit);
    the hold's change of the window is notified at this commit."""
    await repo.announce(db, tenant.name, day)
    return await repo.confirm(db, session_id)


async def holds_request(db: DbSession, tenant: str, request_id: str) -> bool:
    """Whether an admission of this tenant's request_id holds its budget (and may be
    writing its session)."""
    return await repo.holds_request(db, tenant, request_id)


async def release_orphans(db: async_sessionmaker[DbSession], now: datetime) -> list[str]:
    """Release the holds whose session was never written (an admission that died between
    its hold and its writes, and so could not undo it); the ids of those released."""
    async with db() as s:
        ids = await repo.orphans(s, older_than=now - repo.ORPHAN_AFTER)
    released = []
    for session_id in ids:
        try:
            async with db.begin() as s:
                if not await repo.release(s, session_id):
                    continue
                # Claimed (locked): an admission's writes that committed meanwhile keep it.
                if await repo.has_session(s, session_id):
                    raise _Kept
        except _Kept:
            continue
        released.append(session_id)
    return released


class _Kept(Exception):
    """Rolls back the release of a hold whose session turned out to exist."""


class BudgetReader:
    """Reads budget windows for GetBudget, from memory while that is exact.

    Every reservation and settlement notifies its window at commit (BUDGET_CHANNEL). A
    window's totals are kept from a read until a change of it is heard, and only while
    the bus hears every change: never older than the last change committed and
    notified. Otherwise, and after a gap in hearing, it reads the database.
    """

    def __init__(self, sessions: async_sessionmaker[DbSession]) -> None:
        self._engine: AsyncEngine = sessions.kw["bind"]
        # Concurrent GetBudgets of a tenant's day share one database read, never an older one.
        self.reads: Coalescer[tuple[Decimal, Decimal]] = Coalescer()
        self._bus = bus_of(sessions)
        self._known: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
        self._changes: dict[tuple[str, str], int] = {}  # heard, per window
        self._gaps = 0  # times the bus stopped hearing everything and resumed
        self._bus.subscribe(BUDGET_CHANNEL, self._changed)
        self._bus.on_resume(self._forget)

    def _changed(self, payload: str) -> None:
        tenant, _, day = payload.rpartition(" ")
        key = (tenant, day)
        self._changes[key] = self._changes.get(key, 0) + 1
        self._known.pop(key, None)
        if len(self._changes) > MAX_KNOWN:
            self._forget()

    def _forget(self) -> None:
        self._gaps += 1
        self._known.clear()
        self._changes.clear()

    async def window(self, tenant: Tenant, day: date) -> BudgetWindow:
        start, end = window_bounds(day, tenant.time_zone)
        spent, reserved = await self._totals_of((tenant.name, day.isoformat()))
        return BudgetWindow(
            tenant=tenant.name,
            day=day.isoformat(),
            time_zone=tenant.time_zone,
            window_start=start,
            window_end=end,
            limit_usd=tenant.daily_limit_usd,
            spent_usd=spent,
            reserved_usd=reserved,
        )

    async def _totals_of(self, key: tuple[str, str]) -> tuple[Decimal, Decimal]:
        known = self._known.get(key)
        if known is not None and self._bus.hears_all():
            return known
        before = (self._gaps, self._changes.get(key, 0))
        totals = await self.reads.get(key, lambda: self._totals(*key))
        # Kept only if nothing changed the window since before the read started.
        if self._bus.hears_all() and (self._gaps, self._changes.get(key, 0)) == before:
            if len(self._known) >= MAX_KNOWN:
                self._known.clear()
            self._known[key] = totals
        return totals

    async def _totals(self, tenant: str, day: str) -> tuple[Decimal, Decimal]:
        # A bare connection (the cheapest read), outside the store's sessions: so the
        # outage translation is applied here.
        with database_outages():
            async with self._engine.connect() as conn:
                return await repo.window_totals(conn, tenant, day)

    @staticmethod
    def today(tenant: Tenant, now: datetime) -> date:
        return day_of(now, tenant.time_zone)
