"""Leases: every running session names its server and how long that claim holds.

The owner renews its sessions' leases while it runs them. Any server closes sessions
whose lease has expired (their owner died) as ERROR/INTERRUPTED, settles their
reservations and appends their final event, so nothing stays RUNNING forever and
watchers re-attached with StreamSession see the end. It also releases the budget holds
of admissions that died before they wrote their session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import DBAPIError

from ...domain import ErrorReason, SessionState, utcnow
from ...errors import DatabaseUnavailable
from ...money.ledger import release_orphans
from ...recurring import RecurringProblem
from ...sandbox.folders import SessionFolders
from ...store import sessions as repo
from ...store.outages import cause
from ..parts import SessionParts
from ..run.ending import write_end

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
        parts: SessionParts,
        config: LeaseConfig,
        folders: SessionFolders,
        on_lost: Callable[[str], None],
        on_cancel: Callable[[str], None] = lambda _: None,
    ) -> None:
        """Leases are kept for `capacity.live`; `on_lost(id)` is told of a session we run
        that another server closed, `on_cancel(id)` of one another server was asked to
        cancel (in case its NOTIFY was missed); a recovered session's folder here is
        removed; the outbox of `parts` gets the deliveries a recovered end owes. Leases are
        written through the running sessions' own pool."""
        self._db = parts.upkeep_db
        self._webhooks = parts.webhooks
        self.config = config
        self._live = parts.capacity.live
        self._folders = folders
        self._on_lost = on_lost
        self._on_cancel = on_cancel

    async def renew(self) -> None:
        """Extend the leases of the sessions this server runs; a session another server
        has meanwhile closed (we were cut off too long) is reported lost."""
        ids = list(self._live)
        if not ids:
            return
        async with self._db.begin() as db:
            kept = await repo.renew_leases(
                db, owner=self.config.owner, ids=ids, until=self.config.expiry(utcnow())
            )
            cancelled = await repo.cancel_requested(db, ids)
        for session_id in set(ids) - kept:
            if session_id in self._live:
                self._on_lost(session_id)
        for session_id in cancelled:
            self._on_cancel(session_id)

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
                ended = await write_end(
                    db,
                    final,
                    expect=session.state,
                    lease_expired_by=now,
                    webhooks=self._webhooks,
                )
                if ended is None:
                    continue  # closed meanwhile, or its owner renewed the lease: alive
            closed.append(final.id)
            # What is left of its agent on this host (a dead server sharing the work dir).
            await self._folders.remove(self._folders.dirs(final.tenant, final.id).root)
            log.warning(
                "session_interrupted", extra={"session_id": final.id, "tenant": final.tenant}
            )
        for session_id in await release_orphans(self._db, now):
            log.warning("budget_hold_released", extra={"session_id": session_id})
        return closed

    async def run(self) -> None:
        """Renew and recover until cancelled; database outages are waited out."""
        interval = self.config.ttl_s / 3
        problem = RecurringProblem(log, "lease upkeep failed (database unavailable)")
        while True:
            try:
                await self.renew()
                await self.recover()
                problem.resolved()
            except (DBAPIError, DatabaseUnavailable) as exc:
                problem.failed(cause(exc.__cause__ or exc))  # the driver's error, if chained
            await asyncio.sleep(interval)
