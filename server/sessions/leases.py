"""Leases: every running session names its server and how long that claim holds.

The owner renews its sessions' leases while it runs them. Any server closes sessions
whose lease has expired (their owner died) as ERROR/INTERRUPTED, settles their
reservations and appends their final event, so nothing stays RUNNING forever and
watchers re-attached with StreamSession see the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..budgets.ledger import settle_session
from ..domain import ErrorReason, Event, EventKind, Session, SessionState, utcnow
from ..errors import DatabaseUnavailable
from ..store import sessions as repo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseConfig:
    """This server's identity and how long its claims last."""

    owner: str
    ttl_s: float = 30.0

    def expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.ttl_s)


class LeaseKeeper:
    """Renews this server's leases and recovers sessions of dead servers."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        config: LeaseConfig,
        live_ids: Callable[[], Collection[str]],
        on_lost: Callable[[str], None],
        on_recovered: Callable[[Session], Awaitable[None]],
    ) -> None:
        self._db = db
        self.config = config
        self._live_ids = live_ids
        self._on_lost = on_lost
        self._on_recovered = on_recovered

    async def renew(self) -> None:
        """Extend the leases of the sessions this server runs; a session another server
        has meanwhile closed (we were cut off too long) is reported lost."""
        ids = list(self._live_ids())
        if not ids:
            return
        async with self._db.begin() as db:
            kept = await repo.renew_leases(
                db, owner=self.config.owner, ids=ids, until=self.config.expiry(utcnow())
            )
        for session_id in set(ids) - kept:
            if session_id in self._live_ids():
                self._on_lost(session_id)

    async def recover(self) -> list[str]:
        """Close every active session whose lease expired; returns their ids."""
        now = utcnow()
        async with self._db() as db:
            expired = await repo.expired_sessions(db, now=now)
        closed = []
        for session in expired:
            final = session.evolve(
                state=SessionState.ERROR,
                end_time=now,
                error_reason=ErrorReason.INTERRUPTED,
                error_message="the server running the session stopped before it ended",
            )
            async with self._db.begin() as db:
                if not await repo.save_progress(db, final, expect=session.state):
                    continue  # closed meanwhile by its owner or another server
                await settle_session(db, session_id=final.id, actual=final.cost_usd, now=now)
                seq = await repo.last_seq(db, final.id) + 1
                await repo.insert_events(
                    db, [Event(final.id, seq, now, EventKind.RESULT, {"session": final.to_json()})]
                )
            closed.append(final.id)
            await self._on_recovered(final)
            log.warning("session_interrupted", extra={"session_id": final.id, "tenant": final.tenant})
        return closed

    async def run(self) -> None:
        """Renew and recover until cancelled; database outages are waited out."""
        interval = self.config.ttl_s / 3
        while True:
            try:
                await self.renew()
                await self.recover()
            except (DBAPIError, DatabaseUnavailable) as exc:
                log.warning("lease upkeep failed (database unavailable): %s", type(exc).__name__)
            await asyncio.sleep(interval)
