"""How many agents this server holds, against AGENTPLANE_MAX_SESSIONS.

Every agent CLI the server has running counts once, whatever holds it: a live session, a
session being admitted, or the warm pool (waiting, starting, or being closed). So a full
pool and the most cold sessions together never exceed the limit.
"""

from __future__ import annotations

import asyncio

from ..domain import SessionState
from ..errors import QuotaExceeded
from .live import LiveSession


class Capacity:
    """The one owner of the counts: live sessions (by id), admissions, pooled agents."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live: dict[str, LiveSession] = {}
        self.admitting = 0
        self.pooled = 0
        self._watchers: list[asyncio.Event] = []

    def wake_on_free(self, event: asyncio.Event) -> None:
        """Set `event` whenever a place frees up (the warm pool refills then)."""
        self._watchers.append(event)

    def _freed(self) -> None:
        for event in self._watchers:
            event.set()

    @property
    def used(self) -> int:
        """Agents held now, in every state."""
        return len(self.live) + self.admitting + self.pooled

    @property
    def room(self) -> int:
        """How many more agents could start now."""
        return self.limit - self.used

    def sessions(self) -> list[tuple[str, SessionState, bool]]:
        """Each live session's tenant, state and whether it waits for its caller (the
        metrics read this from their own thread: one copy of the table, then reads)."""
        return [
            (live.session.tenant, live.session.state, live.awaiting_caller)
            for live in list(self.live.values())
        ]

    # -- sessions ------------------------------------------------------------------------

    def begin_admission(self, *, warm: bool) -> None:
        """Hold a place for a session being admitted. `warm`: it brings a warm agent the
        pool handed out, whose place it takes over; otherwise QuotaExceeded when full."""
        if warm:
            self.pooled -= 1
        elif self.room <= 0:
            raise QuotaExceeded(
                "CONCURRENCY_LIMIT",
                "server:max_sessions",
                f"this server already runs its maximum of {self.limit} agents "
                "(AGENTPLANE_MAX_SESSIONS, warm agents included); retry later or on "
                "another replica",
            )
        self.admitting += 1

    def admitted(self, live: LiveSession) -> None:
        """The admission succeeded: its place is the live session's until `ended`."""
        self.admitting -= 1
        self.live[live.id] = live

    def not_admitted(self, *, warm_returned: bool) -> None:
        """The admission failed (or re-attached); a warm agent it brought goes back to the
        pool with its place."""
        self.admitting -= 1
        if warm_returned:
            self.pooled += 1
        self._freed()

    def ended(self, session_id: str) -> None:
        """A live session ended and its agent is gone."""
        self.live.pop(session_id, None)
        self._freed()

    # -- the warm pool -------------------------------------------------------------------

    def claim_pooled(self) -> bool:
        """Hold a place for a warm agent about to start; False when there is none."""
        if self.room <= 0:
            return False
        self.pooled += 1
        return True

    def release_pooled(self) -> None:
        """A warm agent failed to start, or was closed unused."""
        self.pooled -= 1
        self._freed()
