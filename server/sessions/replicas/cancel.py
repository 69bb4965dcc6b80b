"""Stopping sessions: cancel by a caller, a caller gone away, a lost lease, and drain."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...domain import ErrorReason, Session, utcnow
from ...errors import FailedPrecondition
from ...store import sessions as repo
from ...store.engine import bus_of
from ...store.notify import CANCEL_CHANNEL, notify
from ...tenants import Tenant
from ..capacity import Capacity
from ..live import LiveSession
from ..records.queries import SessionQueries


class SessionStopper:
    """Asks live sessions to stop; each then ends through its own lifecycle (interrupted,
    charged for what it used, recorded ERROR with the reason given)."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        capacity: Capacity,
        queries: SessionQueries,
        *,
        remote_wait_s: float = 30.0,
        poll_s: float = 0.05,
    ) -> None:
        self._db = db
        # Another replica's CancelSession for a session this one runs.
        bus_of(db).subscribe(CANCEL_CHANNEL, self.cancelled_elsewhere)
        self._live = capacity.live
        self._queries = queries
        self._remote_wait_s = remote_wait_s
        self._poll_s = poll_s

    async def cancel(self, tenant: Tenant, session_id: str) -> Session:
        """Cancel a session, wherever it runs: an IDLE one never starts, a RUNNING one is
        interrupted.

        Returns the session in its terminal state (one another replica runs: as it is
        after `remote_wait_s`, if its owner has not ended it by then); FailedPrecondition
        if it had ended.
        """
        session = await self._queries.get(tenant, session_id)
        if session.state.terminal:
            raise _ended(session)
        live = self._live.get(session_id)
        if live is None:
            return await self._cancel_elsewhere(tenant, session)
        live.request_cancel(ErrorReason.CANCELLED)
        await live.finished.wait()
        return _cancelled(live.session)

    async def _cancel_elsewhere(self, tenant: Tenant, session: Session) -> Session:
        """Flag the session for its owner (NOTIFY tells it at once), then wait for the end."""
        async with self._db.begin() as db:
            flagged = await repo.request_cancel(db, session.id, at=utcnow())
            if flagged:
                await notify(db, CANCEL_CHANNEL, session.id)
        deadline = asyncio.get_running_loop().time() + self._remote_wait_s
        while True:
            session = await self._queries.get(tenant, session.id)
            if session.state.terminal:
                if not flagged:  # it ended before the request reached it
                    raise _ended(session)
                return _cancelled(session)
            if asyncio.get_running_loop().time() >= deadline:
                return session
            await asyncio.sleep(self._poll_s)

    def cancelled_elsewhere(self, session_id: str) -> None:
        """Another replica took a CancelSession for a session we run: stop it."""
        live = self._live.get(session_id)
        if live is not None:
            live.request_cancel(ErrorReason.CANCELLED)

    @staticmethod
    def disconnected(live: LiveSession) -> None:
        """The RunSession caller that started this session went away: cancel it."""
        live.request_cancel(ErrorReason.CANCELLED)

    def tenants_removed(self, names: set[str]) -> int:
        """A reload removed these tenants: stop their sessions that run here (ERROR/
        CANCELLED, settled). Returns how many were asked to stop."""
        lives = [lv for lv in self._live.values() if lv.session.tenant in names]
        for live in lives:
            self.tenant_removed(live)
        return len(lives)

    @staticmethod
    def tenant_removed(live: LiveSession) -> None:
        """Stop one session of a tenant a reload removed."""
        live.request_cancel(
            ErrorReason.CANCELLED,
            f"tenant {live.session.tenant!r} was removed from the tenants file",
        )

    def lost(self, session_id: str) -> None:
        """Another server closed a session we still run (we were cut off): stop it."""
        live = self._live.get(session_id)
        if live is not None:
            live.request_cancel(
                ErrorReason.INTERRUPTED, "another server closed the session while it was cut off"
            )

    async def drain(self, grace_s: float, force: asyncio.Event | None = None) -> None:
        """Give running sessions `grace_s` to finish (or until `force` is set), then
        interrupt the rest (ERROR/SHUTDOWN, settled). New ones must be refused first."""
        lives = list(self._live.values())
        if lives:
            done = asyncio.ensure_future(asyncio.gather(*(lv.finished.wait() for lv in lives)))
            waiters: set[asyncio.Future[Any]] = {done}
            if force is not None:
                waiters.add(asyncio.ensure_future(force.wait()))
            await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Interrupt every live session, recording it ERROR/SHUTDOWN."""
        lives = list(self._live.values())
        for live in lives:
            live.request_cancel(ErrorReason.SHUTDOWN)
        await asyncio.gather(*(live.finished.wait() for live in lives))


def _cancelled(final: Session) -> Session:
    """The end of a session asked to stop: CANCELLED, or FailedPrecondition when it ended
    otherwise first (it completed, or failed, before the request took effect)."""
    if final.error_reason is not ErrorReason.CANCELLED:
        raise _ended(final)
    return final


def _ended(session: Session) -> FailedPrecondition:
    return FailedPrecondition(
        f"session {session.id} has already ended ({session.state.value}); "
        "only IDLE or RUNNING sessions can be cancelled"
    )
