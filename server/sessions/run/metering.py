"""Each settled model request of a running session, written as it settles.

With each request the session's totals so far (cost, tokens, turns) are written too, so
GetSession on any replica shows a running session's progress, and crash recovery, which
closes a dead replica's session at its recorded totals, settles it at what its requests
cost; a request still in flight there left its pending record, which recovery charges at
its estimate (see `ending.py`): a dead replica loses no spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...domain import SessionState, usd, utcnow
from ...errors import DatabaseUnavailable
from ...gateway.meter import MeteredRequest
from ...store import sessions as repo
from ...store.model_requests import ModelRequestRecord, settle_records
from ..live import LiveSession

log = logging.getLogger(__name__)


class RequestRecorder:
    """Records one running session's model requests (see the module docstring)."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        live: LiveSession,
        *,
        retry_s: float = 0.5,
        give_up_s: float = 60.0,
    ) -> None:
        self._db = db
        self._live = live
        self._retry_s = retry_s
        self._give_up_s = give_up_s  # of failing writes in a row (a long database outage)
        self._pending: list[ModelRequestRecord] = []
        self._writing: asyncio.Task[None] | None = None

    def add(self, request: MeteredRequest) -> None:
        """A request settled at the gateway: count it in the session, write it soon."""
        session = self._live.session
        completed = request.outcome == "completed"
        self._live.session = session.evolve(
            cost_usd=usd(session.cost_usd + request.cost_usd),
            usage=session.usage.plus(request.usage),
            num_turns=session.num_turns + (1 if completed else 0),
        )
        self._pending.append(
            ModelRequestRecord(
                session_id=session.id,
                tenant=session.tenant,
                started_at=request.started_at,
                ended_at=request.ended_at or utcnow(),
                model=request.model,
                outcome=request.outcome,
                status=request.status,
                usage=request.usage,
                cost_usd=usd(request.cost_usd),
                price_version=request.price_version,
                upstream_request_id=request.upstream_request_id,
                request_id=request.request_id,
            )
        )
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write(), name=f"meter-{session.id}")

    async def _write(self) -> None:
        failing_since: float | None = None
        while self._pending:
            batch, self._pending = self._pending, []
            progress = self._live.session
            try:
                async with self._db.begin() as db:
                    # In place of their pending records (see money/in_flight.py).
                    await settle_records(db, batch)
                    if progress.state is SessionState.RUNNING:
                        await repo.save_progress(db, progress, expect=SessionState.RUNNING)
            except (DBAPIError, DatabaseUnavailable) as exc:
                now = asyncio.get_running_loop().time()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since > self._give_up_s:
                    # The session's end still records its totals (and retries on its own).
                    log.error(
                        "recording %d model requests of %s failed for good (%s)",
                        len(batch) + len(self._pending),
                        progress.id,
                        type(exc).__name__,
                    )
                    self._pending.clear()
                    return
                log.warning(
                    "recording model requests of %s failed (%s); retrying",
                    progress.id,
                    type(exc).__name__,
                )
                self._pending = batch + self._pending
                await asyncio.sleep(self._retry_s)
            else:
                failing_since = None

    async def close(self, timeout_s: float = 10.0) -> None:
        """Wait for what is recorded so far to be written (up to `timeout_s`)."""
        if self._writing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writing), timeout_s)
