"""A problem that recurs on every retry, logged so that its log stays readable: its cause
when it starts or changes, then again only while it lasts on, at growing intervals."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# The first repeat of an unchanged cause is logged after this long; each next one after
# twice as long as the one before, up to MAX_INTERVAL_S.
FIRST_INTERVAL_S = 2.0
MAX_INTERVAL_S = 300.0


class RecurringProblem:
    """Logs `event` with the cause of each failure: at once when the cause is new (or the
    last failure is more than `new_after_s` past: a new problem), else only when the next
    backed-off interval is due, saying how many times it failed meanwhile; `resolved` logs
    the end of a problem once."""

    def __init__(
        self,
        logger: logging.Logger,
        event: str,
        *,
        max_interval_s: float = MAX_INTERVAL_S,
        new_after_s: float = MAX_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._event = event
        self._max_interval_s = max_interval_s
        self._new_after_s = new_after_s
        self._clock = clock
        self._cause: str | None = None
        self._since = self._last = self._due = 0.0
        self._interval = FIRST_INTERVAL_S
        self._failures = 0

    @property
    def cause(self) -> str | None:
        """The cause of the problem going on (None: none is)."""
        return self._cause

    def failed(self, cause: str, *, said: bool = False) -> None:
        """One more failure, for `cause` (the driver's words, one line). `said`: a new
        cause was already logged in other words (it is not logged again now)."""
        now = self._clock()
        if cause != self._cause or now - self._last > self._new_after_s:
            self._cause, self._since, self._failures = cause, now, 0
            self._interval = FIRST_INTERVAL_S
            self._due = now + self._interval
            if not said:
                self._log.warning("%s: %s", self._event, cause)
        elif now >= self._due:
            self._interval = min(self._interval * 2, self._max_interval_s)
            self._due = now + self._interval
            self._log.warning(
                "%s (still: %d failures in %.0f s): %s",
                self._event,
                self._failures + 1,
                now - self._since,
                cause,
                extra={"failures": self._failures + 1},
            )
        self._failures += 1
        self._last = now

    def resolved(self) -> None:
        """The problem is over (logged when there was one)."""
        if self._cause is None:
            return
        self._log.info(
            "%s: resolved after %d failures in %.0f s",
            self._event,
            self._failures,
            self._clock() - self._since,
            extra={"failures": self._failures},
        )
        self._cause = None
