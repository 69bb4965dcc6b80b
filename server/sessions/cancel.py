"""Stopping sessions: cancel by a caller, a caller gone away, a lost lease, and drain."""

from __future__ import annotations

import asyncio
from typing import Any

from ..domain import ErrorReason, Session
from ..errors import FailedPrecondition
from ..tenants import Tenant
from .capacity import Capacity
from .live import LiveSession
from .queries import SessionQueries


class SessionStopper:
    """Asks live sessions to stop; each then ends through its own lifecycle (interrupted,
    charged for what it used, recorded ERROR with the reason given)."""

    def __init__(self, capacity: Capacity, queries: SessionQueries) -> None:
        self._live = capacity.live
        self._queries = queries

    async def cancel(self, tenant: Tenant, session_id: str) -> Session:
        """Cancel a session: an IDLE one never starts, a RUNNING one is interrupted.

        Returns the session in its terminal state; FailedPrecondition if it had ended.
        """
        session = await self._queries.get(tenant, session_id)
        if session.state.terminal:
            raise FailedPrecondition(
                f"session {session_id} has already ended ({session.state.value}); "
                "only IDLE or RUNNING sessions can be cancelled"
            )
        live = self._live.get(session_id)
        if live is None:
            raise FailedPrecondition(
                f"session {session_id} is not running on this server; cancel it on its owner"
            )
        live.request_cancel(ErrorReason.CANCELLED)
        await live.finished.wait()
        return live.session

    @staticmethod
    def disconnected(live: LiveSession) -> None:
        """The RunSession caller that started this session went away: cancel it."""
        live.request_cancel(ErrorReason.CANCELLED)

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
