"""Connection pools that give back what they do not use: PostgreSQL's connections are few
and shared by every replica.

SQLAlchemy's QueuePool closes an overflow connection when it is returned, but keeps its
`pool_size` connections open for good. `IdleClosingPool` is that pool, last in first out
(so the connections a light load needs stay warm and the rest go idle), whose connections
unused for a while `close_idle` closes; their slots stay, and the next checkout that needs
one reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import greenlet_spawn

log = logging.getLogger(__name__)

_RETURNED = "agentplane.returned_at"  # key of a connection's `info`: when it was returned


@dataclass(frozen=True)
class PoolSize:
    """How many connections a pool opens: up to `size` kept while they are used (each is
    closed once unused for `idle_timeout_s`), and up to `overflow` more for a burst, each
    closed as soon as it is returned."""

    size: int = 5
    overflow: int = 5
    idle_timeout_s: float = 60.0

    @property
    def most(self) -> int:
        """The most connections the pool ever holds."""
        return self.size + self.overflow


class IdleClosingPool(AsyncAdaptedQueuePool):
    """An asyncio QueuePool that notes when each connection came back, and closes the
    ones idle too long when asked (`close_idle`). Create it with `pool_use_lifo=True`."""

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if record.dbapi_connection is not None:
            record.info[_RETURNED] = time.monotonic()
        super()._do_return_conn(record)

    def _idle_records(self) -> list[ConnectionPoolEntry]:
        """Every record waiting in the pool, taken out of it, most recently returned first
        (no await here: nothing else touches the pool meanwhile)."""
        taken = []
        while not self._pool.empty():
            taken.append(self._pool.get(False))
        return taken

    def close_idle(self, older_than_s: float) -> int:
        """Close the pooled connections unused for `older_than_s`; their slots stay in the
        pool (a checkout of one reconnects). Call it inside greenlet_spawn (closing awaits).
        Returns how many it closed."""
        now = time.monotonic()
        waiting = self._idle_records()
        stale = [
            r
            for r in waiting
            if r.dbapi_connection is not None and now - r.info.get(_RETURNED, now) > older_than_s
        ]
        # The others go back as they were (a LIFO queue: the least recent first); the
        # stale stay out while they close, so no checkout gets one half closed.
        for record in reversed(waiting):
            if record not in stale:
                self._pool.put(record, False)
        try:
            for record in stale:
                record.close()
        finally:
            # Closed slots go under the open ones, so a checkout reconnects only when
            # every open connection is in use. A burst may have filled the pool meanwhile:
            # the closed slots it has no room for go (as an overflow connection's does).
            again = self._idle_records()
            kept = stale[: max(0, self._pool.maxsize - len(again))]
            for _ in stale[len(kept) :]:
                self._dec_overflow()
            for record in [*kept, *reversed(again)]:
                self._pool.put(record, False)
        return len(stale)

    def connections(self) -> int:
        """How many connections are open now (checked out or waiting in the pool)."""
        waiting = self._idle_records()
        for record in reversed(waiting):
            self._pool.put(record, False)
        idle_open = sum(r.dbapi_connection is not None for r in waiting)
        return self.checkedout() + idle_open


# SQLAlchemy names a pool's logger after the pool's class: this one's is under
# agentplane's, whose INFO lines are shown. Its pool's lines at INFO (each dispose and
# recreation) stay unshown, as those of SQLAlchemy's own pools are (it sets WARN).
logging.getLogger(f"{__name__}.{IdleClosingPool.__name__}").setLevel(logging.WARNING)


async def close_idle_connections(engine: AsyncEngine, idle_timeout_s: float) -> None:
    """Until cancelled, close `engine`'s connections once unused for `idle_timeout_s`
    (checked every half of it)."""
    while True:
        await asyncio.sleep(idle_timeout_s / 2)
        pool = engine.sync_engine.pool  # replaced by dispose(): look it up each time
        if isinstance(pool, IdleClosingPool):
            closed = await greenlet_spawn(pool.close_idle, idle_timeout_s)
            if closed:
                log.debug("closed %d idle database connections", closed)
