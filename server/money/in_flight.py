"""The pending records of model requests: written before the gateway forwards a request.

A request's cost is known when it settles; a server killed before then would lose it. So
the gateway awaits :meth:`PendingWriter.record` before it forwards a request: a row of
``model_requests_in_flight`` with the request's estimate (its reservation, the worst
case). Its settlement replaces the row with the request's ``model_requests`` row (one
transaction, see ``sessions/run/metering.py``); crash recovery charges the rows a dead server
left at their estimate (``sessions/run/ending.py``).

Group commit: the records queued while a write runs all go in the next transaction, so a
burst of requests costs one commit, not one each. A record that cannot be written in
``timeout_s`` (the database is down or slow) raises :class:`NotRecorded`: the gateway then
refuses the request rather than forward it unrecorded.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..store.model_requests import PendingRequest, insert_pending

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


class NotRecorded(Exception):
    """The pending record could not be written (in time): the request must not be sent."""


class PendingWriter:
    """Writes this server's pending records, a burst in one transaction (see the module
    docstring). `replica` names the server on each record."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        replica: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._db = db
        self.replica = replica
        self.timeout_s = timeout_s
        self._queue: list[tuple[PendingRequest, asyncio.Future[None]]] = []
        self._writing: asyncio.Task[None] | None = None

    async def record(
        self,
        request_id: str,
        session_id: str,
        model: str,
        estimate_usd: Decimal,
        started_at: datetime,
    ) -> None:
        """Write a request's pending record (committed when this returns); raises
        NotRecorded when it could not be, in `timeout_s`."""
        pending = PendingRequest(
            request_id=request_id,
            session_id=session_id,
            model=model,
            estimate_usd=estimate_usd,
            started_at=started_at,
            replica=self.replica,
        )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((pending, done))
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write(), name="pending-requests")
        try:
            # On a timeout (or the caller's cancellation) `done` is cancelled: the write
            # leaves it be, and a record written late is removed when the request settles.
            await asyncio.wait_for(done, self.timeout_s)
        except TimeoutError:
            raise NotRecorded(
                f"the database did not record the request within {self.timeout_s:g} s"
            ) from None

    async def _write(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            waiting = [(p, f) for p, f in batch if not f.done()]
            if not waiting:
                continue
            try:
                async with self._db.begin() as db:
                    await insert_pending(db, [p for p, _ in waiting])
            except Exception as exc:  # noqa: BLE001 - any failure refuses the requests waiting
                log.warning(
                    "recording %d pending model requests failed (%s): they are refused",
                    len(waiting),
                    type(exc).__name__,
                )
                for _, done in waiting:
                    if not done.done():
                        done.set_exception(
                            NotRecorded(
                                f"the database could not record the request ({type(exc).__name__})"
                            )
                        )
                continue
            for _, done in waiting:
                if not done.done():
                    done.set_result(None)

    async def close(self) -> None:
        """Wait for the write under way, if any."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
