"""Coalesced reads: concurrent callers asking for the same thing share one read.

A caller never gets a result read before it asked: it waits for the next read to start,
and every caller that arrived meanwhile shares that read. So each answer is as fresh as a
read of its own (read-your-writes holds), while under load one read serves many callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Key(Generic[T]):
    # The read the callers waiting now will share; it starts after they all arrived.
    next: asyncio.Future[T] | None = None
    running: bool = False


class Coalescer(Generic[T]):
    """Shares reads per key among concurrent callers (see the module docstring). Callers
    of one key must pass the same `read`."""

    def __init__(self) -> None:
        self._keys: dict[Hashable, _Key[T]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.reads = 0  # how many reads were made (for tests and benchmarks)

    async def get(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """The result of a `read()` that starts after this call, shared with the callers
        of the same key that wait for it too. A failed read fails all of them."""
        state = self._keys.setdefault(key, _Key())
        if state.next is None:
            state.next = asyncio.get_running_loop().create_future()
        waiting = state.next
        if not state.running:
            state.running = True
            task = asyncio.get_running_loop().create_task(self._drain(key, state, read))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Shielded: one caller giving up must not cancel the read the others wait for.
        return await asyncio.shield(waiting)

    async def _drain(self, key: Hashable, state: _Key[T], read: Callable[[], Awaitable[T]]) -> None:
        try:
            while state.next is not None:
                shared, state.next = state.next, None
                self.reads += 1
                try:
                    shared.set_result(await read())
                except asyncio.CancelledError:
                    shared.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001  # handed to every waiting caller
                    shared.set_exception(exc)
                    shared.exception()  # retrieved: callers that gave up do not log it
        finally:
            state.running = False
            if state.next is not None:  # only when cancelled: its callers must not hang
                state.next.cancel()
            if self._keys.get(key) is state:
                del self._keys[key]
