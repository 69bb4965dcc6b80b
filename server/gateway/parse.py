"""What the gateway reads out of a Messages request's body, and where it reads it.

:func:`inspect` turns a raw body into the few facts the gateway meters it by, and
:func:`refit` re-encodes it with a lower ``max_tokens``; the gateway never keeps a parsed
body. :class:`BodyParser` runs them on the event loop for a small body and in a worker
process for a large one: a body of up to 32 MB can hold millions of JSON values, and
``json`` parses them, and Python frees them, holding the GIL, so a worker *thread* still
stalls the loop (gRPC health included) for up to a second (BENCHMARKS.md, benchmark 10).
In a worker process the server's loop waits for nothing and its memory never holds the
parse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import server_tools
from .meter import estimate_input_tokens, fit_body, thinking_budget
from .server_tools import OfferedTool

log = logging.getLogger(__name__)
T = TypeVar("T")

OFF_LOOP_BYTES = 1024 * 1024  # bodies above this are parsed in a worker process
WORKERS = 2  # worker processes (started on the first large body)
WORKER_NICENESS = 10
_LONG_CACHE = re.compile(rb'"ttl"\s*:\s*"1h"')


@dataclass(frozen=True)
class RequestFacts:
    """What the gateway meters a request by. ``invalid``: why the body is not a JSON
    object (then nothing else is set)."""

    invalid: str | None = None
    model: str = ""
    max_tokens: int | None = None
    stream: bool = False
    thinking_budget: int | None = None
    input_tokens_estimate: int = 0
    long_cache: bool = False  # asks for 1-hour cache writes
    server_tools: list[OfferedTool] = field(default_factory=list)  # metered per use


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    return parsed if isinstance(parsed, dict) else None


def inspect(raw: bytes, input_margin: float) -> RequestFacts:
    """The facts of a raw Messages request body (see :func:`.estimate_input_tokens`)."""
    body = _json_object(raw)
    if body is None:
        return RequestFacts(invalid="request body must be a JSON object")
    model, max_tokens = body.get("model"), body.get("max_tokens")
    return RequestFacts(
        model=model if isinstance(model, str) else "",
        max_tokens=(
            max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None
        ),
        stream=bool(body.get("stream")),
        thinking_budget=thinking_budget(body),
        input_tokens_estimate=estimate_input_tokens(raw, body, input_margin),
        long_cache=bool(_LONG_CACHE.search(raw)),
        server_tools=server_tools.offered(body),
    )


def refit(
    raw: bytes, max_tokens: int, uses: Mapping[int, int] | None = None
) -> tuple[bytes, int | None]:
    """``raw`` (an inspected, valid body) re-encoded with ``max_tokens`` (lowered, or as
    it was) and the server tools at the indexes of ``uses`` given those ``max_uses``, and
    the thinking budget it is sent with (see :func:`.fit_body`)."""
    body = _json_object(raw)
    assert body is not None, "refit of a body inspect() refused"
    fitted, thinking = fit_body(body, max_tokens)
    if uses:
        fitted = server_tools.with_max_uses(fitted, uses)
    return json.dumps(fitted, separators=(",", ":"), ensure_ascii=False).encode(), thinking


def _lower_priority() -> None:
    # A worker parses what agents send, hostile floods included: the server's own event
    # loop and the agents' CLIs come first on a busy machine.
    os.nice(WORKER_NICENESS)


class ParseFailed(Exception):
    """The worker process died while parsing (a new one serves the next body)."""


class BodyParser:
    """Runs :func:`inspect` and :func:`refit` (or any picklable function) inline for a
    body up to ``off_loop_bytes``, else in one of ``workers`` worker processes."""

    def __init__(self, workers: int = WORKERS, off_loop_bytes: int = OFF_LOOP_BYTES) -> None:
        self.workers = workers
        self.off_loop_bytes = off_loop_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` for a body of ``size`` bytes; :class:`ParseFailed` if its worker
        died. A cancelled caller still waits for the worker to finish, so that the
        session's read turn (see :mod:`.gateway_limits`) bounds the work under way."""
        if size <= self.off_loop_bytes:
            return fn(*args)
        pool = self._worker_pool()
        try:
            future = asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool as exc:  # it broke since: a new one for the next body
            self._replace(pool)
            raise ParseFailed from exc
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise
        except BrokenProcessPool as exc:
            log.error("gateway: a body parser process died; starting a new one")
            self._replace(pool)
            raise ParseFailed from exc

    def _worker_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the server has threads (gRPC), which a fork would copy half-way.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_lower_priority,
            )
        return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._pool is broken:
            self._pool = None
            broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker processes (work under way is abandoned); the next large body
        starts new ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
