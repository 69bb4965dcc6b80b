"""Following sessions that another replica runs: one read per change, shared.

Every follower here of one session shares one `Feed`. The owner's commit of new events is
notified (EVENTS_CHANNEL); the feed then reads them once for all its followers, so the
database's load grows with the sessions followed here, not with their followers. Without
notifications (SQLite, or while the listener reconnects) feeds poll instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...domain import Event, EventKind
from ...errors import Unavailable
from ...store import sessions as repo
from ...store.engine import bus_of
from ...store.notify import EVENTS_CHANNEL

# How often a feed reads when notifications may be missed, and when they cannot be.
POLL_S = 0.25
SAFETY_POLL_S = 5.0


class Feed:
    """The events of one session, read from the database as they are committed."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        tenant: str,
        session_id: str,
        poll_s: Callable[[], float],
    ) -> None:
        self._db = db
        self._tenant = tenant
        self._session_id = session_id
        self._poll_s = poll_s
        self.events: list[Event] = []  # from seq 1, like a LiveSession's
        self.ended = False
        self.error: BaseException | None = None
        self.changed = asyncio.Event()  # replaced after each change
        self._hint = asyncio.Event()
        self.followers = 0
        self.task = asyncio.create_task(self._run(), name=f"feed-{session_id}")

    def hint(self, seq: int | None = None) -> None:
        """Events up to `seq` (None: maybe some) were committed: read them."""
        if seq is None or seq > len(self.events):
            self._hint.set()

    async def _run(self) -> None:
        try:
            while True:
                self._hint.clear()
                async with self._db() as db:
                    # The state first: a session's end commits its state and its `result`
                    # together, so once the state reads terminal, the events read next
                    # hold the result (the other order could miss it).
                    state = await repo.get_state(db, self._tenant, self._session_id)
                    events = await repo.list_events(
                        db, self._session_id, after_seq=len(self.events)
                    )
                self.events.extend(events)
                done = (
                    state is None
                    or state.terminal
                    or any(e.kind is EventKind.RESULT for e in events)
                )
                if events or done:
                    self._changed(ended=done)
                if done:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hint.wait(), self._poll_s())
        except Exception as exc:  # noqa: BLE001 - every follower is told, then it ends
            self.stop(exc)

    def stop(self, error: BaseException) -> None:
        """End the feed: its followers raise `error` after the events read so far."""
        self.error = error
        self._changed(ended=True)

    def _changed(self, *, ended: bool) -> None:
        self.ended = ended
        self.changed.set()
        self.changed = asyncio.Event()


class Feeds:
    """The feeds of this replica, keyed by session, alive while someone follows."""

    def __init__(self, db: async_sessionmaker[DbSession]) -> None:
        self._db = db
        self._feeds: dict[str, Feed] = {}
        self._bus = bus_of(db)
        self._bus.subscribe(EVENTS_CHANNEL, self._on_events)
        self._bus.on_resume(self._on_resume)

    def _poll_s(self) -> float:
        # While every commit is heard, feeds read when told, and poll only as a safety net.
        return SAFETY_POLL_S if self._bus.hears_all() else POLL_S

    def _on_events(self, payload: str) -> None:
        """EVENTS_CHANNEL's handler: "<session id> <last seq>"."""
        session_id, _, seq = payload.partition(" ")
        feed = self._feeds.get(session_id)
        if feed is not None:
            feed.hint(int(seq) if seq.isdigit() else None)

    def _on_resume(self) -> None:
        """The subscription (re)started: anything may have been missed meanwhile."""
        for feed in self._feeds.values():
            feed.hint()

    async def follow(self, tenant: str, session_id: str, after_seq: int) -> AsyncIterator[Event]:
        """The session's events after `after_seq`, to its `result`."""
        feed = self._feeds.get(session_id)
        if feed is None or feed.error is not None:
            feed = self._feeds[session_id] = Feed(self._db, tenant, session_id, self._poll_s)
        feed.followers += 1
        try:
            index = after_seq
            while True:
                changed = feed.changed
                while index < len(feed.events):
                    yield feed.events[index]
                    index += 1
                if feed.error is not None:
                    raise feed.error
                if feed.ended:
                    return
                await changed.wait()
        finally:
            feed.followers -= 1
            if feed.followers == 0 and self._feeds.get(session_id) is feed:
                del self._feeds[session_id]
                feed.task.cancel()

    async def close(self) -> None:
        """Stop every feed; their followers get UNAVAILABLE (this server is stopping)."""
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            feed.task.cancel()
        await asyncio.gather(*(f.task for f in feeds), return_exceptions=True)
        for feed in feeds:
            if not feed.ended:
                feed.stop(
                    Unavailable(
                        "the server is shutting down; follow the session on another replica"
                    )
                )
