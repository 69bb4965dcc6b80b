"""A running session waiting for its caller: input requests, their answers, timeouts.

The owner of a session records each request in the database, publishes it as an
`input_request` event and waits. An answer may come through any replica (`respond`
settles the row and NOTIFYs); the owner's waiter hears it on the bus, or finds it on its
safety poll when notifications may be missed. Whatever settles a request first wins: the
caller, the deadline, or the session's end.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...domain import Decider, EventKind, InputAnswer, InputKind, InputRequest, Session, utcnow
from ...errors import FailedPrecondition, InvalidArgument, NotFound, quote
from ...store import inputs as repo
from ...store.engine import bus_of
from ...store.notify import INPUTS_CHANNEL
from ...tenants import Tenant
from ...webhooks.outbox import WebhookOutbox
from ..live import LiveSession
from ..records.queries import SessionQueries
from ..run_request import is_session_id

# How often a waiter re-reads its request while notifications may be missed, and while
# they are heard (a missed one is then only a lost connection's window).
POLL_S = 0.25
SAFETY_POLL_S = 5.0


class InputHub:
    """This replica's waiting requests, told of answers by the bus."""

    def __init__(
        self, db: async_sessionmaker[DbSession], webhooks: WebhookOutbox | None = None
    ) -> None:
        """`webhooks`: where each request's `session.waiting` deliveries are written (in
        the request's own transaction)."""
        self._db = db
        self._webhooks = webhooks
        self._bus = bus_of(db)
        self._bus.subscribe(INPUTS_CHANNEL, self._heard)
        self._wakes: dict[str, asyncio.Event] = {}

    def _heard(self, payload: str) -> None:
        _, _, request_id = payload.partition(" ")
        wake = self._wakes.get(request_id)
        if wake is not None:
            wake.set()

    def waiter(self, live: LiveSession, timeout_s: float) -> InputWaiter:
        """The waiter of one live session, each answer waited for up to `timeout_s`."""
        return InputWaiter(self, live, timeout_s)

    async def _read(self, request: InputRequest) -> InputAnswer | None:
        async with self._db() as db:
            stored = await repo.get_input(db, request.session_id, request.id)
        return stored.answer if stored is not None else None


class InputWaiter:
    """Asks one live session's caller and waits for the answer (see the module docstring)."""

    def __init__(self, hub: InputHub, live: LiveSession, timeout_s: float) -> None:
        self._hub = hub
        self._live = live
        self.timeout_s = timeout_s

    async def ask(
        self, kind: InputKind, tool_name: str, tool_use_id: str, tool_input: dict[str, Any]
    ) -> InputAnswer:
        """Ask the caller; the answer, or one decided by the timeout or the session's end."""
        live, hub = self._live, self._hub
        now = utcnow()
        request = InputRequest(
            str(uuid.uuid4()),
            live.id,
            kind,
            tool_name,
            tool_use_id,
            tool_input,
            now,
            now + timedelta(seconds=self.timeout_s),
        )
        started = asyncio.get_running_loop().time()
        async with hub._db.begin() as db:
            await repo.insert_request(db, request)
            if hub._webhooks is not None:
                await hub._webhooks.session_waiting(db, live.session, request)
        wake = hub._wakes[request.id] = asyncio.Event()
        answer: InputAnswer | None = None
        try:
            live.session = live.session.evolve(awaiting=(*live.session.awaiting, request))
            live.emit(EventKind.INPUT_REQUEST, request.to_json())
            answer = await self._wait(request, wake)
            return answer
        finally:
            # Also when the wait was cancelled (the agent stopped): its end is an event too.
            del hub._wakes[request.id]
            live.session = live.session.evolve(
                awaiting=tuple(r for r in live.session.awaiting if r.id != request.id)
            )
            live.input_settled()
            waited_ms = int((asyncio.get_running_loop().time() - started) * 1000)
            live.emit(
                EventKind.INPUT_RESOLVED,
                {
                    **(answer or _ended(live)).to_json(request),
                    "tool_name": tool_name,
                    "tool_use_id": tool_use_id,
                    "waited_ms": waited_ms,
                },
            )

    async def _wait(self, request: InputRequest, wake: asyncio.Event) -> InputAnswer:
        live, hub = self._live, self._hub
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            answer = await hub._read(request)
            if answer is not None:
                return answer
            if live.cancel_requested.is_set():
                return await self._settle(request, _ended(live))
            left = deadline - loop.time()
            if left <= 0:
                return await self._settle(request, _timed_out(request.kind, self.timeout_s))
            poll = POLL_S if not hub._bus.hears_all() else SAFETY_POLL_S
            stop = asyncio.ensure_future(live.cancel_requested.wait())
            heard = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait(
                    {stop, heard}, timeout=min(left, poll), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stop.cancel()
                heard.cancel()
            wake.clear()

    async def _settle(self, request: InputRequest, answer: InputAnswer) -> InputAnswer:
        """Settle with `answer` unless the caller's came first (then that one)."""
        async with self._hub._db.begin() as db:
            if await repo.settle(db, request, answer, at=utcnow()):
                return answer
        return await self._hub._read(request) or answer


def _timed_out(kind: InputKind, timeout_s: float) -> InputAnswer:
    message = f"the caller did not answer within {timeout_s:g} s"
    outcome = {
        InputKind.TOOL_CALL: "error",
        InputKind.PERMISSION: "deny",
        InputKind.QUESTION: "unanswered",
    }[kind]
    return InputAnswer(Decider.TIMEOUT, outcome, message)


def _ended(live: LiveSession) -> InputAnswer:
    return InputAnswer(Decider.SESSION_END, "ended", live.cancel_message or "the session ended")


async def respond(
    db: async_sessionmaker[DbSession],
    queries: SessionQueries,
    tenant: Tenant,
    session_id: str,
    request_id: str,
    kind: InputKind,
    answer: InputAnswer,
) -> tuple[InputRequest, InputAnswer]:
    """Settle a request of a session of `tenant` with the caller's `answer` (of `kind`).

    NotFound for another tenant's session or an unknown request; FailedPrecondition
    (ALREADY_ANSWERED, SESSION_ENDED) when it can no longer be answered; InvalidArgument
    when `answer` is not of the request's kind.
    """
    if not request_id:
        raise InvalidArgument("request_id", "must not be empty")
    session = await queries.get(tenant, session_id)
    if not is_session_id(request_id):
        raise NotFound(f"no input request {quote(request_id)} in session {session_id}")
    async with db.begin() as tx:
        stored = await repo.get_input(tx, session_id, request_id)
        if stored is None:
            raise NotFound(f"no input request {quote(request_id)} in session {session_id}")
        request = stored.request
        if stored.answer is None and request.kind is not kind:
            raise InvalidArgument(
                "response",
                f"request {request_id} asks for {_EXPECTED[request.kind]}, not {_EXPECTED[kind]}",
            )
        if stored.answer is None and await repo.settle(tx, request, answer, at=utcnow()):
            return request, answer
    async with db() as tx:
        stored = await repo.get_input(tx, session_id, request_id)
    raise _unanswerable(session, request, stored.answer if stored is not None else None)


_EXPECTED = {
    InputKind.TOOL_CALL: "a tool result (`tool_result`)",
    InputKind.PERMISSION: "a decision (`permission`)",
    InputKind.QUESTION: "answers (`answer`)",
}


def _unanswerable(
    session: Session, request: InputRequest, answer: InputAnswer | None
) -> FailedPrecondition:
    if answer is None or answer.decided_by is Decider.TIMEOUT:
        return FailedPrecondition(
            f"input request {request.id} timed out at {request.deadline.isoformat()}",
            "ALREADY_ANSWERED",
        )
    if answer.decided_by is Decider.SESSION_END:
        return FailedPrecondition(
            f"session {session.id} ended before input request {request.id} was answered",
            "SESSION_ENDED",
        )
    return FailedPrecondition(
        f"input request {request.id} was already answered", "ALREADY_ANSWERED"
    )
