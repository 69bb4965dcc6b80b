"""What the metering gateway reads: a cap on a request's body and a few reads per session.

The gateway runs in the server process, outside every session's cgroup, so a body it
reads is the server's memory. A body over the cap is refused (413) before it is buffered:
from its ``Content-Length``, or by counting the bytes of a chunked body as they arrive and
stopping at the cap. A session has at most :data:`READS_PER_SESSION` requests being read
and parsed at once; more wait their turn (the CLI's own concurrent requests just queue),
and past :data:`WAITING_PER_SESSION` waiting ones a request gets 429 (the CLI retries it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

# The Messages API refuses request bodies over 32 MB; the gateway refuses them first.
MAX_BODY_BYTES = 32 * 1024 * 1024
READS_PER_SESSION = 2
WAITING_PER_SESSION = 8


class BodyTooLarge(Exception):
    """The body is (or declares itself) over ``limit`` bytes."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit
        self.declared = declared


class TooManyReads(Exception):
    """The session already has its reads under way and its queue of waiting ones full."""


def over_cap(request: web.Request, limit: int) -> BodyTooLarge | None:
    """A refusal when the request's ``Content-Length`` is over ``limit`` (headers only)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        return BodyTooLarge(limit, declared)
    return None


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, read chunk by chunk; :class:`BodyTooLarge` as soon as more than
    ``limit`` bytes arrived (a chunked body has no ``Content-Length`` to check first)."""
    if (refusal := over_cap(request, limit)) is not None:
        raise refusal
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class ReadSlots:
    """One session's turns at reading and parsing a request body (see the module
    docstring). Single-threaded: used on the event loop only."""

    def __init__(self, reads: int = READS_PER_SESSION, waiting: int = WAITING_PER_SESSION) -> None:
        if reads < 1 or waiting < 0:
            raise ValueError("reads must be >= 1 and waiting >= 0")
        self.reads = reads
        self.waiting_max = waiting
        self._free = asyncio.Semaphore(reads)
        self.waiting = 0  # requests waiting for a turn
        self.under_way = 0  # requests being read or parsed
        # The gateway logs each kind of refusal once per session, not once per request.
        self.logged: set[str] = set()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold one of the session's reads; wait for one, or :class:`TooManyReads`."""
        if self._free.locked():
            if self.waiting >= self.waiting_max:
                raise TooManyReads
            self.waiting += 1
            try:
                await self._free.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._free.acquire()
        self.under_way += 1
        try:
            yield
        finally:
            self.under_way -= 1
            self._free.release()
