"""The outbox table's claims, on SQLite and PostgreSQL: one sender at a time per
delivery, a claim that lapses is taken again, a stopping sender hands its claims back,
a key is written once, ended deliveries are pruned. Times are passed in: no sleeping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from agentplane.server.domain import utcnow
from agentplane.server.store import outbox as repo
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from agentplane.server.tenants import TenantRegistry
from agentplane.server.webhooks.outbox import webhook_id
from agentplane.server.webhooks.sender import SenderConfig, WebhookSender
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

pytestmark = pytest.mark.asyncio

LEASE = timedelta(seconds=30)


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[async_sessionmaker[DbSession]]:
    engine = create_engine(database_url)
    await migrate(engine)
    yield sessionmaker(engine)
    await engine.dispose()


async def add(
    db: async_sessionmaker[DbSession],
    tenant: str,
    *,
    dedupe: str | None = None,
    window: timedelta = timedelta(hours=1),
) -> repo.NewDelivery:
    now = utcnow()
    new = repo.NewDelivery(
        id=webhook_id(),
        tenant=tenant,
        event="session.ended",
        target="main",
        url="http://127.0.0.1:9/x",
        body="{}",
        created_at=now,
        deadline=now + window,
        dedupe_key=dedupe,
    )
    async with db.begin() as s:
        await repo.insert_deliveries(s, [new])
    return new


async def claim(
    db: async_sessionmaker[DbSession], tenant: str, owner: str, now_offset_s: float = 0
) -> list[repo.Delivery]:
    now = utcnow() + timedelta(seconds=now_offset_s)
    async with db.begin() as s:
        return await repo.claim(s, tenant=tenant, owner=owner, now=now, until=now + LEASE, limit=10)


async def test_a_claim_holds_until_its_lease_ends_then_another_takes_it(
    db: async_sessionmaker[DbSession],
) -> None:
    new = await add(db, "t-lease")
    assert [d.id for d in await claim(db, "t-lease", "a")] == [new.id]
    assert await claim(db, "t-lease", "b") == []  # held by a
    # a died: once its lease is over, b takes the delivery, with its id.
    taken = await claim(db, "t-lease", "b", now_offset_s=LEASE.total_seconds() + 1)
    assert [d.id for d in taken] == [new.id]
    # a comes back and records its attempt: kept, but the delivery is b's to settle.
    attempt = repo.Attempt(1, utcnow(), 5, 200, "", "a")
    async with db.begin() as s:
        changed = await repo.record_attempt(
            s, taken[0], attempt, state=repo.DELIVERED, next_attempt_at=utcnow(), ended_at=utcnow()
        )
    assert changed is False
    async with db() as s:
        (listed,) = await repo.list_deliveries(
            s, "t-lease", repo.DeliveryFilter(), after=None, limit=10
        )
    assert listed.state == repo.PENDING and [a.sender for a in listed.history] == ["a"]
    async with db() as s:
        assert await repo.attempt_number(s, new.id) == 2


async def test_a_stopping_sender_hands_its_claims_back(db: async_sessionmaker[DbSession]) -> None:
    new = await add(db, "t-release")
    assert len(await claim(db, "t-release", "a")) == 1
    async with db.begin() as s:
        assert await repo.release(s, "a") == 1
    assert [d.id for d in await claim(db, "t-release", "b")] == [new.id]


async def test_a_key_is_written_once(db: async_sessionmaker[DbSession]) -> None:
    await add(db, "t-once", dedupe="t-once/main/budget.threshold/2027-01-12")
    await add(db, "t-once", dedupe="t-once/main/budget.threshold/2027-01-12")
    await add(db, "t-once", dedupe="t-once/main/budget.threshold/2027-01-13")
    async with db() as s:
        found = await repo.list_deliveries(s, "t-once", repo.DeliveryFilter(), after=None, limit=9)
    assert len(found) == 2


async def test_ended_deliveries_are_pruned_with_their_attempts(
    db: async_sessionmaker[DbSession],
) -> None:
    done, pending = await add(db, "t-prune"), await add(db, "t-prune")
    (claimed,) = [d for d in await claim(db, "t-prune", "a") if d.id == done.id]
    old = utcnow() - timedelta(days=40)
    async with db.begin() as s:
        await repo.record_attempt(
            s,
            claimed,
            repo.Attempt(1, old, 3, 200, "", "a"),
            state=repo.DELIVERED,
            next_attempt_at=old,
            ended_at=old,
        )
    async with db.begin() as s:
        assert await repo.delete_ended(s, utcnow() - timedelta(days=30)) >= 1
    async with db() as s:
        left = await repo.list_deliveries(s, "t-prune", repo.DeliveryFilter(), after=None, limit=9)
    assert [d.id for d in left] == [pending.id]


async def test_postgres_claims_skip_rows_another_transaction_holds(
    db: async_sessionmaker[DbSession], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SKIP LOCKED is PostgreSQL's (SQLite serves one server)")
    first, second = await add(db, "t-skip"), await add(db, "t-skip")
    now = utcnow()
    async with db.begin() as a:
        # a's claim is not committed yet: b neither waits for it nor takes its rows.
        mine = await repo.claim(a, tenant="t-skip", owner="a", now=now, until=now + LEASE, limit=1)
        async with db.begin() as b:
            theirs = await asyncio.wait_for(
                repo.claim(b, tenant="t-skip", owner="b", now=now, until=now + LEASE, limit=5), 5
            )
    assert {d.id for d in mine} | {d.id for d in theirs} == {first.id, second.id}
    assert not {d.id for d in mine} & {d.id for d in theirs}


async def test_a_retry_sent_after_its_deadline_fails_without_another_attempt(
    db: async_sessionmaker[DbSession],
) -> None:
    # Its window closed a second ago; its first attempt failed and the retry came due
    # within the window, but no sender took it before the deadline (a busy replica).
    new = await add(db, "t-late", window=timedelta(seconds=-1))
    (taken,) = await claim(db, "t-late", "a")
    async with db.begin() as s:
        await repo.record_attempt(
            s,
            taken,
            repo.Attempt(1, utcnow(), 5, None, "cannot connect", "a"),
            state=repo.PENDING,
            next_attempt_at=utcnow(),
            ended_at=None,
        )
    sender = WebhookSender(db, TenantRegistry([]), SenderConfig(owner="b", poll_s=0.05))
    running = asyncio.create_task(sender.run())
    try:
        for _ in range(600):  # until the sender settles it (a cap for a broken test)
            async with db() as s:
                (listed,) = await repo.list_deliveries(
                    s, "t-late", repo.DeliveryFilter(), after=None, limit=10
                )
            if listed.state != repo.PENDING:
                break
            await asyncio.sleep(0.05)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert listed.id == new.id and listed.state == repo.FAILED and listed.ended_at is not None
    assert [a.number for a in listed.history] == [1]  # no attempt past the deadline
