"""How many agents this server holds, against AGENTPLANE_MAX_SESSIONS.

Every agent CLI the server has running counts once, whatever holds it: a live session, a
session being admitted, or the warm pool (waiting, starting, or being closed). So a full
pool and the most cold sessions together never exceed the limit.

A full replica refuses a cold session with ReplicaFull (UNAVAILABLE: the client's service
config retries it on another replica) and tells `on_full`, which turns its health name
`agentplane.admission` NOT_SERVING so that the client's balancing of RunSession sends new
sessions elsewhere until a place frees. "Full" means no session can start here: every place taken and none of them by a
warm agent (a request the warm pool matches still can).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..domain import SessionState
from ..errors import ReplicaFull
from .live import LiveSession

# The RetryInfo a refusal carries: a place frees when any session here ends, and other
# replicas may have one now.
FULL_RETRY_AFTER_S = 1.0


class Capacity:
    """The one owner of the counts: live sessions (by id), admissions, pooled agents."""

    def __init__(self, limit: int, on_full: Callable[[bool], None] = lambda full: None) -> None:
        """`on_full(full)` is told each time the replica becomes full or has room again."""
        self.limit = limit
        self.live: dict[str, LiveSession] = {}
        self.admitting = 0
        self.pooled = 0
        self._watchers: list[asyncio.Event] = []
        self._on_full = on_full
        self._was_full = False

    @property
    def full(self) -> bool:
        """No session can start here now (not even one a warm agent would serve)."""
        return self.room <= 0 and self.pooled <= 0

    def _changed(self) -> None:
        full = self.full
        if full != self._was_full:
            self._was_full = full
            self._on_full(full)

    def wake_on_free(self, event: asyncio.Event) -> None:
        """Set `event` whenever a place frees up (the warm pool refills then)."""
        self._watchers.append(event)

    def _freed(self) -> None:
        self._changed()
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
        pool handed out, whose place it takes over; otherwise ReplicaFull when full."""
        if warm:
            self.pooled -= 1
        elif self.room <= 0:
            raise ReplicaFull(
                f"this replica already runs its maximum of {self.limit} agents "
                "(AGENTPLANE_MAX_SESSIONS, warm agents included); retry on another replica "
                "or later",
                FULL_RETRY_AFTER_S,
            )
        self.admitting += 1
        self._changed()

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
        self._changed()
        return True

    def release_pooled(self) -> None:
        """A warm agent failed to start, or was closed unused."""
        self.pooled -= 1
        self._freed()
