"""The budget ledger on a real database: atomic reservations, exactly-once settlement."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from agentplane.server.domain import Session, SessionState
from agentplane.server.errors import QuotaExceeded
from agentplane.server.money.ledger import (
    BudgetReader,
    release_hold,
    release_orphans,
    reserve_for_session,
    settle_session,
)
from agentplane.server.money.windows import day_of, window_bounds
from agentplane.server.store import ledger
from agentplane.server.store import sessions as repo
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from agentplane.server.store.models import ReservationRow
from agentplane.server.tenants import Tenant
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

pytestmark = pytest.mark.asyncio

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def tenant(name: str, limit: str = "1.0", tz: str = "UTC", concurrent: int = 64) -> Tenant:
    return Tenant(
        name=name,
        token_sha256=frozenset(),
        anthropic_api_key_env="X",
        allowed_tools=("Read",),
        system_prompt=None,
        daily_limit_usd=Decimal(limit),
        max_session_budget_usd=Decimal("0.5"),
        max_turns=3,
        max_concurrent_sessions=concurrent,
        time_zone=tz,
    )


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    await migrate(engine)
    yield sessionmaker(engine)
    await engine.dispose()


async def admit(db: async_sessionmaker[AsyncSession], t: Tenant, amount: str) -> str | None:
    """What admission does: insert the session and reserve, in one transaction."""
    session = Session(
        id=str(uuid.uuid4()),
        tenant=t.name,
        state=SessionState.IDLE,
        create_time=NOW,
        max_budget_usd=Decimal(amount),
        max_turns=3,
        allowed_tools=("Read",),
    )
    day = day_of(NOW, t.time_zone).isoformat()
    try:
        async with db.begin() as s:
            await repo.insert_session(s, session, request_hash="h", budget_day=day)
            await reserve_for_session(
                s, t, session_id=session.id, amount=Decimal(amount), day=day, now=NOW
            )
    except QuotaExceeded:
        return None
    return session.id


async def test_concurrent_admissions_never_pass_the_limit_together(
    db: async_sessionmaker[AsyncSession],
) -> None:
    t = tenant(f"t{uuid.uuid4().hex[:8]}")
    results = await asyncio.gather(*(admit(db, t, "0.25") for _ in range(20)))
    admitted = [r for r in results if r]
    assert len(admitted) == 4

    reader = BudgetReader(db)
    window = await reader.window(t, NOW.date())
    assert window.reserved_usd == Decimal("1.000000") and window.remaining_usd == 0
    async with db() as s:  # the refused ones left nothing behind
        assert all([await repo.get_session(s, t.name, sid) for sid in admitted])
        listed = await repo.list_sessions(s, t.name, repo.SessionFilter(), after=None, limit=100)
    assert len(listed) == 4

    for sid in admitted:
        async with db.begin() as s:
            assert await settle_session(s, session_id=sid, actual=Decimal("0.123456"), now=NOW)
    async with db.begin() as s:  # exactly once
        assert not await settle_session(s, session_id=admitted[0], actual=Decimal(9), now=NOW)
    window = await reader.window(t, NOW.date())
    assert window.spent_usd == Decimal("0.493824") and window.reserved_usd == 0
    assert window.remaining_usd == Decimal("0.506176")
    assert await admit(db, t, "0.5") is not None
    assert await admit(db, t, "0.1") is None


async def test_holds_count_a_tenants_active_sessions_exactly(
    db: async_sessionmaker[AsyncSession],
) -> None:
    t = tenant(f"c{uuid.uuid4().hex[:8]}", limit="100", concurrent=3)
    results = await asyncio.gather(*(admit(db, t, "0.1") for _ in range(12)))
    admitted = [r for r in results if r]
    assert len(admitted) == 3
    with pytest.raises(QuotaExceeded) as refused:
        async with db.begin() as s:
            await reserve_for_session(
                s, t, session_id=str(uuid.uuid4()), amount=Decimal("0.1"), day="2026-03-01", now=NOW
            )
    assert refused.value.reason == "CONCURRENCY_LIMIT"
    async with db.begin() as s:  # one ends: its place is free
        assert await settle_session(s, session_id=admitted[0], actual=Decimal(0), now=NOW)
    assert await admit(db, t, "0.1") is not None
    assert await admit(db, t, "0.1") is None


async def hold(db: async_sessionmaker[AsyncSession], t: Tenant, amount: str, now: datetime) -> str:
    """A hold in a transaction of its own, as admission takes it (no session written)."""
    session_id = str(uuid.uuid4())
    async with db.begin() as s:
        await reserve_for_session(
            s, t, session_id=session_id, amount=Decimal(amount), day="2026-03-01", now=now
        )
    return session_id


async def window_row(db: async_sessionmaker[AsyncSession], t: Tenant) -> tuple[Decimal, int]:
    async with db() as s:
        w = await ledger.get_window(s, t.name, "2026-03-01")
        assert w is not None
        return w.reserved_usd, w.holds


async def test_a_hold_undone_leaves_nothing_behind(db: async_sessionmaker[AsyncSession]) -> None:
    t = tenant(f"u{uuid.uuid4().hex[:8]}")
    kept, undone = await hold(db, t, "0.25", NOW), await hold(db, t, "0.5", NOW)
    assert await window_row(db, t) == (Decimal("0.75"), 2)
    async with db.begin() as s:
        assert await release_hold(s, undone)
    async with db.begin() as s:  # exactly once
        assert not await release_hold(s, undone)
    assert await window_row(db, t) == (Decimal("0.25"), 1)
    async with db() as s:
        assert await s.get(ReservationRow, undone) is None
        assert await s.get(ReservationRow, kept) is not None


async def test_a_hold_whose_admission_died_is_released_by_recovery(
    db: async_sessionmaker[AsyncSession],
) -> None:
    t = tenant(f"o{uuid.uuid4().hex[:8]}")
    orphan = await hold(db, t, "0.25", NOW)  # its admission died before writing its session
    admitted = await admit(db, t, "0.5")
    assert await release_orphans(db, NOW) == []  # not yet: its admission may be writing
    later = NOW + ledger.ORPHAN_AFTER + timedelta(seconds=1)
    assert orphan in await release_orphans(db, later)
    assert await window_row(db, t) == (Decimal("0.5"), 1)  # the admitted one's hold stays
    async with db() as s:
        assert await s.get(ReservationRow, orphan) is None
        assert (await s.get(ReservationRow, admitted)) is not None


async def test_windows_follow_the_tenants_time_zone(db: async_sessionmaker[AsyncSession]) -> None:
    t = tenant(f"tz{uuid.uuid4().hex[:8]}", tz="America/New_York")
    late = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)  # still March 1st in New York
    assert day_of(late, t.time_zone).isoformat() == "2026-03-01"
    start, end = window_bounds(day_of(late, t.time_zone), t.time_zone)
    assert start == datetime(2026, 3, 1, 5, 0, tzinfo=UTC)
    assert end == datetime(2026, 3, 2, 5, 0, tzinfo=UTC)
    # A DST change makes a 23-hour day.
    start, end = window_bounds(datetime(2026, 3, 8).date(), t.time_zone)
    assert (end - start).total_seconds() == 23 * 3600


async def test_a_session_spanning_midnight_settles_into_the_day_it_was_admitted(
    db: async_sessionmaker[AsyncSession],
) -> None:
    t = tenant(f"mid{uuid.uuid4().hex[:8]}")
    late = datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC)
    session_id = await admit_at(db, t, "0.4", late)
    next_day = datetime(2026, 3, 2, 0, 1, tzinfo=UTC)
    async with db.begin() as s:
        assert await settle_session(s, session_id=session_id, actual=Decimal("0.25"), now=next_day)
    reader = BudgetReader(db)
    first = await reader.window(t, late.date())
    second = await reader.window(t, next_day.date())
    assert (first.spent_usd, first.reserved_usd) == (Decimal("0.25"), 0)
    assert (second.spent_usd, second.reserved_usd) == (0, 0)  # a new day starts at 0


async def admit_at(
    db: async_sessionmaker[AsyncSession], t: Tenant, amount: str, now: datetime
) -> str:
    session = Session(
        id=str(uuid.uuid4()),
        tenant=t.name,
        state=SessionState.IDLE,
        create_time=now,
        max_budget_usd=Decimal(amount),
        max_turns=3,
        allowed_tools=("Read",),
    )
    day = day_of(now, t.time_zone).isoformat()
    async with db.begin() as s:
        await repo.insert_session(s, session, request_hash="h", budget_day=day)
        await reserve_for_session(
            s, t, session_id=session.id, amount=Decimal(amount), day=day, now=now
        )
    return session.id
