"""A running session's event stream: numbering, fan-out to watchers, batched persistence."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from ..domain import ErrorReason, Event, EventKind, Session, utcnow
from ..tenants import EventLimits

log = logging.getLogger(__name__)

STOP_MESSAGES = {
    ErrorReason.CANCELLED: "the session was cancelled",
    ErrorReason.SHUTDOWN: "the server shut down before the session ended",
}

Persist = Callable[[Sequence[Event]], Awaitable[None]]
# Transient events a watcher may fall behind by; older ones are dropped for it (the
# numbered events that assemble them always come).
MAX_TRANSIENT_BACKLOG = 4096


class EventWriter:
    """Writes a session's events in batches, off the path that streams them.

    At most one write starts per `interval` seconds: an event after a quiet spell is
    written at once, a burst waits for the interval to pass and goes in one batch (events
    published in one turn of the event loop always do). A failed write (the database is down) is
    retried with the batch kept in order, so the persisted log never has a gap. At most
    `max_pending` events wait; past that `on_overflow` is called once (the session must
    end: events are never dropped silently).
    """

    def __init__(
        self,
        persist: Persist,
        *,
        interval: float = 0.05,
        max_pending: int = 10_000,
        on_overflow: Callable[[], None] = lambda: None,
    ) -> None:
        self._persist = persist
        self._interval = interval
        self._max_pending = max_pending
        self._on_overflow = on_overflow
        self._overflowed = False
        self._pending: list[Event] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._loop(), name="event-writer")

    def add(self, event: Event) -> None:
        self._pending.append(event)
        self._wake.set()
        if len(self._pending) > self._max_pending and not self._overflowed:
            self._overflowed = True
            self._on_overflow()

    async def _loop(self) -> None:
        delay = 0.2
        loop = asyncio.get_running_loop()
        last = -self._interval  # when the last write started
        while True:
            await self._wake.wait()
            if not self._closing:
                await asyncio.sleep(max(0.0, last + self._interval - loop.time()))
            last = loop.time()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                try:
                    await self._persist(batch)
                    delay = 0.2
                except Exception as exc:  # noqa: BLE001 - any failure: keep the batch, retry
                    log.warning(
                        "writing %d events failed (%s); retrying in %.1f s",
                        len(batch),
                        type(exc).__name__,
                        delay,
                    )
                    self._pending[:0] = batch
                    self._wake.set()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
            if self._closing and not self._pending:
                return

    async def close(self, timeout: float | None = None) -> bool:
        """Write everything still pending, then stop; False if that took over `timeout`
        (the writer keeps trying until `abort`)."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            return False
        return True

    def abort(self) -> None:
        """Stop trying; what is still pending is left to crash recovery."""
        self._task.cancel()


class LiveSession:
    """A session this server is running: the source of its events until it ends.

    Watchers follow from any sequence number and each sees every event exactly once, in
    order: events live in memory for the session's lifetime, so there is no window in
    which one has been published but is not yet readable.

    Transient events (text deltas) are a side channel: not numbered (seq 0), not
    persisted, and seen only by watchers following at the time, in their place between
    the numbered events.

    What a session stores is bounded (`limits`): the event that would pass its count
    (one is kept for the `result`) or its bytes (the payloads' JSON) is not published;
    the session is stopped (EVENT_LIMIT) and every later event but the `result` is
    dropped. Whatever produced them (an agent's tools can forge the CLI's output) cannot
    grow the log further.
    """

    def __init__(
        self,
        session: Session,
        persist: Persist,
        on_publish: Callable[[Session, Event], None] | None = None,
        *,
        write_interval_s: float = 0.05,
        limits: EventLimits | None = None,
    ) -> None:
        """Events are written with `persist`, batched for up to `write_interval_s`; a
        session whose events cannot be written for longer than the writer's buffer lasts
        ends ERROR/DATABASE_UNAVAILABLE."""
        self.session = session
        self.limits = limits or EventLimits()
        # The bytes stored so far: events' payloads (the result aside) and transcript entries.
        self.stored_bytes = 0
        # Why the session reached its event limit ("" while it has not).
        self.event_limit_message = ""
        self.writer = EventWriter(persist, interval=write_interval_s, on_overflow=self._overflowed)
        # Told of every published event (telemetry); must not raise.
        self.on_publish = on_publish or (lambda _session, _event: None)
        self.task: asyncio.Task[None] | None = None
        self.cancel_requested = asyncio.Event()
        self.cancel_reason: ErrorReason | None = None
        self.cancel_message = ""
        # The SDK's session id, known from the CLI's init message (used to resume).
        self.sdk_session_id = ""
        self.finished = asyncio.Event()
        # Event-loop time a wait for the caller last ended: the idle clock restarts there.
        self.input_settled_at = 0.0
        self._events: list[Event] = []
        # Each watcher's transient events not yet yielded: (events published before it, it).
        self._transient: dict[int, deque[tuple[int, Event]]] = {}
        self._wake = asyncio.Event()
        self._ended = False
        self._sealed = False

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def next_seq(self) -> int:
        """The number the next event will have."""
        return len(self._events) + 1

    def build(self, kind: EventKind, data: dict[str, Any]) -> Event:
        """The next event of this session (not yet published)."""
        return Event(self.session.id, self.next_seq, utcnow(), kind, data)

    def seal(self) -> None:
        """The session's end is being recorded, its result numbered `next_seq`: from now
        on only that result is published (an event that comes later, a raise of the
        budget applied as the session ends, say, would take the result's number)."""
        self._sealed = True

    def publish(self, event: Event, *, persist: bool = True) -> None:
        """Make an event visible to watchers (and queue it for the database), if it is
        within the session's limits (see the class docstring) and the session is not
        sealed."""
        if event.kind is not EventKind.RESULT and (self._sealed or not self._within_limits(event)):
            return
        if event.seq != len(self._events) + 1:
            raise RuntimeError(f"event {event.seq} out of order after {len(self._events)}")
        self._events.append(event)
        if persist:
            self.writer.add(event)
        self.on_publish(self.session, event)
        self._wake.set()
        self._wake = asyncio.Event()

    def publish_transient(self, kind: EventKind, data: dict[str, Any]) -> None:
        """Give the watchers following now an unnumbered event (see the class docstring)."""
        if not self._transient:
            return
        event = Event(self.session.id, 0, utcnow(), kind, data)
        position = len(self._events)
        for backlog in self._transient.values():
            backlog.append((position, event))
        self._wake.set()
        self._wake = asyncio.Event()

    def emit(self, kind: EventKind, data: dict[str, Any]) -> Event:
        event = self.build(kind, data)
        self.publish(event)
        return event

    def _within_limits(self, event: Event) -> bool:
        if self.event_limit_message:
            return False
        if event.seq >= self.limits.max_events:  # the last one is the result's
            return self._reached(
                f"the session stored its maximum of {self.limits.max_events} events "
                "(the tenant's max_events) and was stopped"
            )
        return self.charge(len(json.dumps(event.data)))  # as stored (ASCII: chars are bytes)

    def charge(self, size: int) -> bool:
        """Count `size` more bytes the session stores (an event's payload, or its
        transcript's entries), if they fit its limit; else the session is stopped there.
        A negative size gives back what was not stored after all."""
        if size <= 0:
            self.stored_bytes += size
            return True
        if self.event_limit_message:
            return False
        if self.stored_bytes + size > self.limits.max_bytes:
            return self._reached(
                f"the session's events and transcript reached its maximum of "
                f"{self.limits.max_bytes >> 20} MiB (the tenant's max_events_mib) "
                "and it was stopped"
            )
        self.stored_bytes += size
        return True

    def _reached(self, message: str) -> bool:
        """The session is at its limit: say so, stop it; False (nothing more is stored)."""
        self.event_limit_message = message
        log.warning(
            "session_event_limit",
            extra={"session_id": self.id, "events": len(self._events), "bytes": self.stored_bytes},
        )
        self.request_cancel(ErrorReason.EVENT_LIMIT, message)
        return False

    def _overflowed(self) -> None:
        self.request_cancel(
            ErrorReason.DATABASE_UNAVAILABLE,
            "the database was unreachable for longer than the session's event buffer lasts",
        )

    @property
    def awaiting_caller(self) -> bool:
        """Whether the session waits for its caller now, for an answer or for a raise of
        its budget (the idle timeout does not run)."""
        return bool(self.session.awaiting) or self.session.paused is not None

    def input_settled(self) -> None:
        self.input_settled_at = asyncio.get_running_loop().time()

    def request_cancel(self, reason: ErrorReason, message: str = "") -> None:
        """Ask the run to stop (the first reason given wins)."""
        if not self.cancel_requested.is_set():
            self.cancel_reason = reason
            self.cancel_message = message or STOP_MESSAGES.get(reason, reason.value)
            self.cancel_requested.set()

    def end(self) -> None:
        """No more events will come; watchers finish after the last one."""
        self._ended = True
        self._wake.set()
        self.finished.set()

    async def follow(self, after_seq: int = 0) -> AsyncIterator[Event]:
        """Events after `after_seq`, then live ones until the session ends (with the
        transient ones published meanwhile)."""
        index = max(after_seq, 0)
        backlog: deque[tuple[int, Event]] = deque(maxlen=MAX_TRANSIENT_BACKLOG)
        self._transient[id(backlog)] = backlog
        try:
            while True:
                wake = self._wake
                while True:
                    if backlog and backlog[0][0] <= index:
                        yield backlog.popleft()[1]
                    elif index < len(self._events):
                        yield self._events[index]
                        index += 1
                    else:
                        break
                if self._ended:
                    return
                await wake.wait()
        finally:
            del self._transient[id(backlog)]
