"""Deleting ended sessions: DeleteSession, and each tenant's retention in the background.

A deletion removes the session's row and, by cascade, all that hangs off it; every
replica forgets it at once (the deletion is notified), so none answers it from memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...domain import utcnow
from ...errors import FailedPrecondition, NotFound
from ...store import sessions as repo
from ...store.notify import DELETED_CHANNEL, notify
from ...tenants import Tenant
from .queries import SessionQueries

log = logging.getLogger(__name__)

# Sessions deleted per transaction by the background sweep.
BATCH = 100


class SessionDeleter:
    """Deletes ended sessions (see the module docstring)."""

    def __init__(self, db: async_sessionmaker[DbSession], queries: SessionQueries) -> None:
        self._db = db
        self._queries = queries

    async def delete(self, tenant: Tenant, session_id: str) -> None:
        """Delete an ended session of `tenant`; NotFound, or FailedPrecondition while it
        has not ended."""
        session = await self._queries.get(tenant, session_id)
        if not session.state.terminal:
            raise FailedPrecondition(
                f"session {session.id} is {session.state.value}: cancel it first, then delete it"
            )
        async with self._db.begin() as db:
            deleted = await repo.delete_session(db, session)
            if deleted:
                await notify(db, DELETED_CHANNEL, session.id)
        if not deleted:
            raise NotFound(f"session {session_id} not found")

    async def sweep(self, tenants: Iterable[Tenant]) -> int:
        """Delete each tenant's sessions that ended more than its retention_days ago."""
        count = 0
        for tenant in tenants:
            if not tenant.retention_days:
                continue
            before = utcnow() - timedelta(days=tenant.retention_days)
            while True:
                async with self._db.begin() as db:
                    old = await repo.ended_before(db, tenant.name, before, BATCH)
                    for session in old:
                        if await repo.delete_session(db, session):
                            await notify(db, DELETED_CHANNEL, session.id)
                            count += 1
                if len(old) < BATCH:
                    break
        return count

    async def run(self, tenants: Callable[[], Iterable[Tenant]], interval_s: float) -> None:
        """Sweep every `interval_s` until cancelled (a failed sweep is retried next time)."""
        while True:
            try:
                deleted = await self.sweep(tenants())
                if deleted:
                    log.info("retention_swept", extra={"sessions": deleted})
            except Exception as exc:  # noqa: BLE001 - a database outage, say: next time
                log.warning("retention sweep failed (%s)", type(exc).__name__)
            await asyncio.sleep(interval_s)
