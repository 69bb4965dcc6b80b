"""What the event streams of both clients share: the call, and the ``input_request`` events
their handlers answer before the stream is read on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _inputs as inputs
from .v1 import session_pb2


class StreamCore:
    """One RunSession / StreamSession call; a subclass reads it (blocking or awaited) and
    answers each pending request with ``respond`` (a Respond call) before reading on."""

    def __init__(
        self,
        call: Any,
        handlers: inputs.Handlers | None = None,
        respond: Callable[[session_pb2.RespondRequest], Any] | None = None,
    ) -> None:
        self._call = call
        self._handlers = handlers or inputs.Handlers()
        self._respond_with = respond
        self._pending: inputs.AnyRequest | None = None

    def _received(self, event: session_pb2.SessionEvent) -> session_pb2.SessionEvent:
        """Note the request an event asks one of the handlers for; return the event."""
        if self._handlers:
            self._pending = self._handlers.pending(event)
        return event

    def _take_pending(self) -> inputs.AnyRequest | None:
        """The request to answer before the next event, once."""
        request, self._pending = self._pending, None
        return request

    def _handler(self, request: inputs.AnyRequest) -> Callable[[Any], Any]:
        handler = self._handlers.handler(request)
        assert handler is not None
        return handler

    def _respond(self, message: session_pb2.RespondRequest) -> Any:
        assert self._respond_with is not None
        return self._respond_with(message)

    def cancel(self) -> None:
        """End the call (a no-op once it has finished)."""
        self._call.cancel()
