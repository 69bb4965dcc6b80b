"""A tenant's usage over a time range, computed from the database (it survives restarts)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...domain import Usage, utcnow
from ...errors import InvalidArgument
from ...store import usage as repo
from ...tenants import Tenant


class UsageReader:
    """Answers GetUsage: sessions created in [start, end), by outcome, cost, turns, tools;
    model requests that ended in [start, end), by model."""

    def __init__(self, db: async_sessionmaker[DbSession]) -> None:
        self._db = db

    async def usage(self, tenant: Tenant, start: datetime | None, end: datetime | None) -> Usage:
        """`start` unset: from the beginning; `end` unset: until now. InvalidArgument when
        the range is inverted."""
        if start is not None and end is not None and start >= end:
            raise InvalidArgument("end_time", "must be after start_time")
        async with self._db() as db:
            return await repo.usage(db, tenant.name, start, end or utcnow())
