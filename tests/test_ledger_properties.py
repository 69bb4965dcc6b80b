"""Property: any interleaving of reserve and settle keeps spent + reserved <= limit and
never loses a cent (run against a real SQLite database)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from agentplane.server.errors import QuotaExceeded
from agentplane.server.money.ledger import BudgetReader, settle_session
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ledger import admit_at, tenant

NOW = datetime(2026, 5, 5, 12, tzinfo=UTC)
cents = st.integers(min_value=1, max_value=60).map(lambda c: Decimal(c) / 100)
# ("reserve", amount) or ("settle", which held reservation, fraction of it actually spent)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), cents),
        st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 100)),
    ),
    min_size=1,
    max_size=25,
)


async def play(ops: list[tuple]) -> None:
    path = tempfile.mkdtemp(prefix="apl", dir="/tmp")
    engine = create_engine(f"sqlite:///{path}/l.db")
    await migrate(engine)
    db = sessionmaker(engine)
    t = tenant(f"p{uuid.uuid4().hex[:6]}", limit="1.00")
    held: list[tuple[str, Decimal]] = []
    spent = Decimal(0)
    try:
        for op in ops:
            if op[0] == "reserve":
                try:
                    held.append((await admit_at(db, t, str(op[1]), NOW), op[1]))
                except QuotaExceeded:
                    pass
            elif held:
                session_id, amount = held.pop(op[1] % len(held))
                actual = (amount * op[2] / 100).quantize(Decimal("0.000001"))
                async with db.begin() as s:
                    assert await settle_session(s, session_id=session_id, actual=actual, now=NOW)
                spent += actual
            window = await BudgetReader(db).window(t, NOW.date())
            assert window.spent_usd + window.reserved_usd <= window.limit_usd
            assert window.reserved_usd == sum((a for _, a in held), Decimal(0))
            assert window.spent_usd == spent
    finally:
        await engine.dispose()
        shutil.rmtree(path, ignore_errors=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_reserve_and_settle_in_any_order_keep_the_books(ops: list[tuple]) -> None:
    asyncio.run(play(ops))
