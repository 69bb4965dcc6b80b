"""Watches a running session's sandbox for a limit it hit, and stops the session then."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ...sandbox.limits import Breach
from ..live import LiveSession

# How often the cgroup counters and the folder's free space are read (a few small reads).
WATCH_INTERVAL_S = 0.25


async def watch_limits(
    breach: Callable[[], Breach | None], live: LiveSession, interval_s: float = WATCH_INTERVAL_S
) -> None:
    """Until cancelled or the session is asked to stop: on the first limit hit, ask it to
    stop with that limit's reason (the agent is interrupted, then its processes killed)."""
    while not live.cancel_requested.is_set():
        found = breach()
        if found is not None:
            live.request_cancel(found.reason, found.message)
            return
        await asyncio.sleep(interval_s)
