"""Session budgets that change while the session runs: raises, and pauses at the budget.

`UpdateSessionBudget` (`raise_budget`) runs on any replica: in one transaction it raises
the session's budget and reserves the difference in the day window the session was
admitted in (a conditional UPDATE, like an admission), and NOTIFYs the session's owner.
The owner (`BudgetHub`) reads the session's row and gives its meter the new budget.

A session that pauses at its budget (`on_budget_exhausted = PAUSE`) has the gateway
hold a model request its budget cannot cover (`SessionBudget.hold`): the pause is
recorded (the session's row, a `paused` event and a `session.paused` webhook, in one
transaction), the idle timeout stops, and the request waits until the budget is raised
(it is then reserved again, and forwarded if it fits), the session is stopped, or the
tenant's `max_pause_s` passes (the request is refused: the session ends
ERROR/BUDGET_EXCEEDED as without a pause). A raise the day's window cannot cover waits on
the paused session (reason DAILY_LIMIT) for a reload that raises the daily limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..domain import BudgetPause, EventKind, PauseReason, Session, SessionState, usd, utcnow
from ..errors import (
    AgentplaneError,
    DatabaseUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
)
from ..gateway.meter import SessionMeter
from ..store import ledger
from ..store import sessions as repo
from ..store.engine import bus_of
from ..store.notify import SESSION_BUDGET_CHANNEL, notify
from ..tenants import Tenant
from ..webhooks.outbox import WebhookOutbox
from .live import LiveSession
from .run_request import is_session_id, parse_usd

log = logging.getLogger(__name__)

# How often a paused session re-reads its budget while notifications may be missed, and
# while they are heard (a missed one is then only a lost connection's window).
POLL_S = 0.25
SAFETY_POLL_S = 5.0
# Times UpdateSessionBudget reads the budget again when concurrent raises changed it.
RAISE_ATTEMPTS = 20


class _WindowFull(Exception):
    """The day's window cannot cover a raise (the transaction is rolled back)."""


class BudgetHub:
    """This replica's running sessions' budgets, told of raises by the bus."""

    def __init__(
        self, db: async_sessionmaker[DbSession], webhooks: WebhookOutbox | None = None
    ) -> None:
        self._db = db
        self._webhooks = webhooks
        self._bus = bus_of(db)
        self._bus.subscribe(SESSION_BUDGET_CHANNEL, self._heard)
        self._sessions: dict[str, SessionBudget] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def session(self, live: LiveSession, max_pause_s: float) -> SessionBudget:
        """The budget of a session that starts here (until `SessionBudget.close`)."""
        budget = SessionBudget(self, live, max_pause_s)
        self._sessions[live.id] = budget
        return budget

    def _heard(self, session_id: str) -> None:
        budget = self._sessions.get(session_id)
        if budget is not None:
            self._spawn(budget.refresh())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def limits_raised(self, tenants: dict[str, Tenant]) -> int:
        """A reload changed these tenants' daily limits: retry the raises that wait for
        their day's window on sessions paused here. Returns how many are retried."""
        waiting = [
            b
            for b in self._sessions.values()
            if b.live.session.tenant in tenants
            and b.live.session.paused is not None
            and b.live.session.paused.pending_usd is not None
        ]
        for budget in waiting:
            self._spawn(budget.retry_pending(tenants[budget.live.session.tenant]))
        return len(waiting)


class SessionBudget:
    """One running session's budget: raises reach its meter, and its pauses."""

    def __init__(self, hub: BudgetHub, live: LiveSession, max_pause_s: float) -> None:
        self._hub = hub
        self.live = live
        self._max_pause_s = max_pause_s
        self._meter: SessionMeter | None = None
        self._wake = asyncio.Event()
        self._pause: asyncio.Task[bool] | None = None
        self._expired = False  # a pause timed out: requests are refused from now on

    def attach(self, meter: SessionMeter, *, pauses: bool) -> None:
        """Meter the session with its budget as it is now (raised since admission, say);
        with `pauses`, the gateway holds what the budget cannot cover (`hold`)."""
        self._meter = meter
        meter.budget_usd = usd(self.live.session.max_budget_usd)
        meter.hold = self.hold if pauses else None

    def close(self) -> None:
        """The session's run ended: no more raises reach it here."""
        if self._hub._sessions.get(self.live.id) is self:
            del self._hub._sessions[self.live.id]
        if self._pause is not None:
            self._pause.cancel()

    # -- raises ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the session's budget (and a raise waiting for the day's window) and apply
        what changed."""
        try:
            async with self._hub._db() as db:
                stored = await repo.get_session(db, self.live.session.tenant, self.live.id)
        except (DBAPIError, DatabaseUnavailable) as exc:
            log.warning("reading the budget of session %s failed (%s)", self.live.id, exc)
            return
        if stored is not None:
            self.apply(stored)

    def apply(self, stored: Session) -> None:
        """The session's row as read: a raised budget reaches the meter (a held request
        is tried again), a waiting raise shows on the pause."""
        live = self.live
        pause = live.session.paused
        if pause is not None and stored.paused is not None and pause != stored.paused:
            live.session = live.session.evolve(
                paused=BudgetPause(
                    stored.paused.reason, pause.since, pause.deadline, stored.paused.pending_usd
                )
            )
        before = live.session.max_budget_usd
        if stored.max_budget_usd <= before:
            return
        live.session = live.session.evolve(max_budget_usd=stored.max_budget_usd)
        if self._meter is not None:
            self._meter.budget_usd = usd(stored.max_budget_usd)
            self._meter.exhausted = False
        live.emit(
            EventKind.BUDGET_RAISED,
            {"max_budget_usd": str(stored.max_budget_usd), "previous_budget_usd": str(before)},
        )
        log.info(
            "session_budget_raised",
            extra={
                "session_id": live.id,
                "tenant": live.session.tenant,
                "max_budget_usd": str(stored.max_budget_usd),
            },
        )
        self._wake.set()

    async def retry_pending(self, tenant: Tenant) -> None:
        """Try again the raise that waits for the day's window (a reload raised it)."""
        pause = self.live.session.paused
        if pause is None or pause.pending_usd is None:
            return
        try:
            await _reserve_raise(
                self._hub._db,
                tenant,
                self.live.id,
                before=self.live.session.max_budget_usd,
                after=pause.pending_usd,
            )
        except _WindowFull:
            return  # still not enough: it keeps waiting
        except (DBAPIError, DatabaseUnavailable) as exc:
            log.warning("retrying the raise of session %s failed (%s)", self.live.id, exc)

    # -- pauses ----------------------------------------------------------------------

    async def hold(self) -> bool:
        """The gateway's hold of a request the budget cannot cover: True once the budget
        was raised (reserve again), False to refuse it (the pause timed out, the session
        is stopping, or the pause could not be recorded)."""
        if self.live.cancel_requested.is_set() and self._meter is not None:
            self._meter.exhausted = False  # refused for the stop: it ends as the stop says
            return False
        if self._expired:
            return False
        if self._pause is None or self._pause.done():
            assert self._meter is not None
            # The budget the refused reservation saw, read now: a raise applied before the
            # task first runs must still wake it (read there, it would wait for another).
            self._pause = asyncio.create_task(
                self._paused(self._meter.budget_usd), name=f"pause-{self.live.id}"
            )
        # Shielded: the agent hanging up its request does not end the pause.
        return await asyncio.shield(self._pause)

    async def _paused(self, budget: Decimal) -> bool:
        live, meter = self.live, self._meter
        assert meter is not None
        if meter.budget_usd > budget:
            return True  # raised already: reserve again, no pause to record
        now = utcnow()
        pause = BudgetPause(
            PauseReason.SESSION_BUDGET, now, now + timedelta(seconds=self._max_pause_s)
        )
        try:
            await self._record(pause)
        except (DBAPIError, AgentplaneError) as exc:
            log.warning("pausing session %s failed (%s): its request is refused", live.id, exc)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_pause_s
        cancel = asyncio.ensure_future(live.cancel_requested.wait())
        try:
            while True:
                if meter.budget_usd > budget:
                    return True
                if live.cancel_requested.is_set():
                    # Refused for the stop, not the budget: it ends as the stop says.
                    meter.exhausted = False
                    return False
                left = deadline - loop.time()
                if left <= 0:
                    self._expired = True
                    log.info(
                        "session_pause_timed_out",
                        extra={"session_id": live.id, "tenant": live.session.tenant},
                    )
                    return False
                poll = SAFETY_POLL_S if self._hub._bus.hears_all() else POLL_S
                wake = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait(
                    {wake, cancel}, timeout=min(left, poll), return_when=asyncio.FIRST_COMPLETED
                )
                wake.cancel()
                if not self._wake.is_set() and not live.cancel_requested.is_set():
                    await self.refresh()  # the safety poll: a notification may be lost
                self._wake.clear()
        finally:
            cancel.cancel()
            live.session = live.session.evolve(paused=None)
            live.input_settled()  # the idle clock restarts now
            if live.session.state is SessionState.RUNNING:
                with contextlib.suppress(DBAPIError, AgentplaneError):
                    async with self._hub._db.begin() as db:
                        await repo.save_pause(db, live.id, None)

    async def _record(self, pause: BudgetPause) -> None:
        """The pause in the session's row, its webhook (one transaction) and its event."""
        live = self.live
        paused = live.session.evolve(paused=pause)
        async with self._hub._db.begin() as db:
            await repo.save_pause(db, live.id, pause)
            if self._hub._webhooks is not None:
                await self._hub._webhooks.session_paused(db, paused)
        live.session = paused
        live.emit(
            EventKind.PAUSED,
            {
                "pause": pause.to_json(),
                "max_budget_usd": str(paused.max_budget_usd),
                "cost_usd": str(self._meter.spent_usd if self._meter else paused.cost_usd),
            },
        )
        log.info(
            "session_paused",
            extra={
                "session_id": live.id,
                "tenant": live.session.tenant,
                "max_budget_usd": str(paused.max_budget_usd),
                "deadline": pause.deadline.isoformat(),
            },
        )


async def raise_budget(
    db: async_sessionmaker[DbSession], tenant: Tenant, session_id: str, raw: str
) -> Session:
    """UpdateSessionBudget (see the module docstring): the session with its new budget.

    Raises InvalidArgument (malformed or lower), NotFound, FailedPrecondition
    (SESSION_ENDED, SESSION_BUDGET_MAX), QuotaExceeded (BUDGET_EXCEEDED: the day's window
    cannot cover it; a paused session keeps the raise for a raised daily limit)."""
    if not session_id:
        raise InvalidArgument("session_id", "must not be empty")
    if not raw.strip():
        raise InvalidArgument("max_budget_usd", "is required (the new budget, in USD)")
    amount = parse_usd(raw, "max_budget_usd")
    if amount > tenant.max_session_budget_usd:  # first: a huge number cannot be rounded
        raise FailedPrecondition(
            f"{amount if len(raw) < 40 else raw[:40] + '...'} USD is above the tenant's "
            f"per-session maximum of {tenant.max_session_budget_usd} USD "
            "(max_session_budget_usd in the tenants file)",
            "SESSION_BUDGET_MAX",
        )
    if amount != usd(amount):
        raise InvalidArgument("max_budget_usd", "has more than six decimals (a micro-dollar)")
    if not is_session_id(session_id):
        raise NotFound(f"session {session_id[:100]!r} not found")
    for _ in range(RAISE_ATTEMPTS):  # a concurrent raise changed the budget: read it again
        session = await _read(db, tenant, session_id)
        if session.state.terminal:
            raise FailedPrecondition(
                f"session {session_id} has already ended ({session.state.value}); "
                "only an IDLE or RUNNING session's budget can be raised",
                "SESSION_ENDED",
            )
        if amount < session.max_budget_usd:
            raise InvalidArgument(
                "max_budget_usd",
                f"{amount} USD is below the session's budget of {session.max_budget_usd} USD: "
                "a budget can only be raised",
            )
        if amount == session.max_budget_usd:
            return session
        try:
            if not await _reserve_raise(
                db, tenant, session_id, before=session.max_budget_usd, after=amount
            ):
                continue
        except _WindowFull:
            await _keep_pending(db, session, amount)
            raise QuotaExceeded(
                "BUDGET_EXCEEDED",
                f"tenant:{tenant.name}:daily_usd",
                f"the daily budget of tenant {tenant.name!r} cannot cover raising session "
                f"{session_id} by {amount - session.max_budget_usd} USD; "
                + (
                    "the paused session keeps waiting, and the raise is applied when the "
                    "tenant's daily_limit_usd is raised enough"
                    if session.paused is not None
                    else "raise it by less, or when the day's window has room"
                ),
            ) from None
        return await _read(db, tenant, session_id)
    raise FailedPrecondition(
        f"session {session_id}'s budget kept changing meanwhile; read it and retry",
        "BUDGET_CHANGED",
    )


async def _read(db: async_sessionmaker[DbSession], tenant: Tenant, session_id: str) -> Session:
    async with db() as tx:
        session = await repo.get_session(tx, tenant.name, session_id)
    if session is None:
        raise NotFound(f"session {session_id} not found")
    return session


async def _reserve_raise(
    db: async_sessionmaker[DbSession],
    tenant: Tenant,
    session_id: str,
    *,
    before: Decimal,
    after: Decimal,
) -> bool:
    """Raise the budget from `before` to `after` and reserve the difference, atomically;
    False when the budget is no longer `before`; _WindowFull when the window cannot
    cover it."""
    async with db.begin() as tx:
        if not await repo.set_budget(tx, session_id, before=before, after=after):
            return False
        if not await ledger.raise_hold(
            tx, session_id=session_id, amount=after - before, limit=tenant.daily_limit_usd
        ):
            raise _WindowFull
        await notify(tx, SESSION_BUDGET_CHANNEL, session_id)
    return True


async def _keep_pending(
    db: async_sessionmaker[DbSession], session: Session, amount: Decimal
) -> None:
    """A paused session keeps a raise its window cannot cover, for a raised daily limit."""
    if session.state is not SessionState.RUNNING or session.paused is None:
        return
    async with db.begin() as tx:
        if await repo.set_pending_budget(tx, session.id, amount):
            await notify(tx, SESSION_BUDGET_CHANNEL, session.id)
