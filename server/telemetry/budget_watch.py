"""Each tenant's budget window today, kept for the budget gauges (which cannot wait on the
database: they are read on the exporter's thread)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from ..domain import BudgetWindow
from ..errors import AgentplaneError
from ..recurring import RecurringProblem

log = logging.getLogger(__name__)


class BudgetWatch:
    """Reads every tenant's window today with `read`: once before serving (`refresh`),
    then again soon after each change (`changed`: a reservation or settlement committed
    here or, on PostgreSQL, by another replica) and at least every `interval_s` (a new
    day, a change missed while the notifications were down)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[list[BudgetWindow]]],
        *,
        interval_s: float = 30.0,
        settle_s: float = 0.5,
    ) -> None:
        self._read = read
        self._interval_s = interval_s
        self._settle_s = settle_s  # a burst of changes is read once
        self._wake = asyncio.Event()
        self._windows: dict[str, BudgetWindow] = {}
        self._failures = RecurringProblem(log, "budget_gauges_unread")

    @property
    def windows(self) -> Mapping[str, BudgetWindow]:
        """Today's window of each tenant, as last read (replaced whole, never mutated)."""
        return self._windows

    def changed(self, _payload: str = "") -> None:
        """A window changed (a bus handler: cheap, never raises)."""
        self._wake.set()

    async def refresh(self) -> None:
        """Read every window now; on failure keep the last ones and log the cause."""
        try:
            windows = await self._read()
        except Exception as exc:  # noqa: BLE001  (any failure: the gauges keep their values)
            # Our errors' words are safe to log; a driver's may hold SQL: its type only.
            self._failures.failed(str(exc) if isinstance(exc, AgentplaneError) else repr(type(exc)))
            return
        self._failures.resolved()
        self._windows = {w.tenant: w for w in windows}

    async def run(self) -> None:
        """Refresh after each change and every `interval_s`, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
                await asyncio.sleep(self._settle_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.refresh()
