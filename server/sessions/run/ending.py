"""The end of a session, written once: the one transaction that closes it.

A session's normal end (its run finished) and its recovered end (its server died and
another closed it) both go through `write_end`, so the two cannot drift apart: the
terminal state, the settlement of its reservation and the `result` event are written
together, or not at all.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ...domain import Event, EventKind, Session, SessionState, usd, utcnow
from ...money.ledger import settle_session
from ...store import inputs
from ...store import model_requests as requests
from ...store import sessions as repo
from ...webhooks.outbox import WebhookOutbox


def result_event(final: Session, seq: int) -> Event:
    """The `result` event of an ended session: the final Session, numbered `seq`."""
    return Event(
        final.id, seq, final.end_time or utcnow(), EventKind.RESULT, {"session": final.to_json()}
    )


async def write_end(
    db: DbSession,
    final: Session,
    *,
    expect: SessionState,
    seq: int | None = None,
    lease_expired_by: datetime | None = None,
    webhooks: WebhookOutbox | None = None,
) -> Event | None:
    """In `db`'s transaction: record `final` if the session is still in state `expect`
    (and, for a recovery, its lease expired before `lease_expired_by`), settle its
    reservation to `final.cost_usd` (a recovery adds the estimate of each request its
    dead server forwarded and never settled, recorded `interrupted`; a normal end's cost
    is its meter's, which has them all) and append its `result` event as number `seq`
    (default: after the last one persisted). Returns that event, or None when the session
    was closed meanwhile, or its owner renewed its lease (then nothing is written).
    With `webhooks`, the deliveries the end owes (session.ended, and budget.threshold
    when its cost took the day past the tenant's share) are written with it."""
    pending = await requests.pending_of(db, final.id)
    recovery = lease_expired_by is not None
    if recovery and pending:
        final = final.evolve(cost_usd=usd(final.cost_usd + sum(p.estimate_usd for p in pending)))
    if not await repo.save_progress(db, final, expect=expect, lease_expired_by=lease_expired_by):
        return None
    # A raise committed after `final` was made and before this end is the session's budget
    # (the row is ended now: no later raise can change it).
    budget = await repo.budget_of(db, final.id)
    if budget is not None and budget != final.max_budget_usd:
        final = final.evolve(max_budget_usd=budget)
    if recovery:
        at = final.end_time or utcnow()
        await requests.settle_records(
            db, [requests.interrupted(final.tenant, p, at) for p in pending]
        )
    else:
        await requests.drop_pending(db, [p.request_id for p in pending])
    settled = await settle_session(
        db, session_id=final.id, actual=final.cost_usd, now=final.end_time or utcnow()
    )
    if webhooks is not None:
        await webhooks.session_ended(db, final)
        if settled:
            await webhooks.spend_settled(db, final.tenant, final.id)
    # What it still waited for can no longer be answered.
    await inputs.settle_all(
        db, final.id, at=final.end_time or utcnow(), message="the session ended"
    )
    if seq is None:
        seq = await repo.last_seq(db, final.id) + 1
    result = result_event(final, seq)
    await repo.insert_events(db, [result])
    return result
