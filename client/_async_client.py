"""The asyncio client: the client core (``_requests.ClientCore``) over grpc.aio."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import grpc.aio

from . import _files as files
from . import _inputs as inputs
from . import _requests as rq
from . import _values as values
from ._errors import rpc_errors
from ._health import HealthStatus
from ._stream import StreamCore
from .v1 import budget_pb2, session_pb2, usage_pb2


class AsyncEventStream(StreamCore, AsyncIterator[session_pb2.SessionEvent]):
    """The events of one RunSession / StreamSession call, in order.

    ``async for`` over it; errors surface as :class:`RPCError`. ``cancel()`` (or leaving
    an ``async with`` block) ends the call — for RunSession that is a disconnect, which
    cancels the session unless it was started with ``on_disconnect="continue"``.

    With handlers, an ``input_request`` event is yielded first; when the next event is
    asked for, its handler is awaited (a plain function is called) and its answer sent
    with Respond before the stream is read on.
    """

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> session_pb2.SessionEvent:
        request = self._take_pending()
        if request is not None:
            message = await inputs.handle_async(request, self._handler(request))
            if message is not None:
                with inputs.unless_settled(request):
                    await self._respond(message)
        with rpc_errors():
            event = await self._call.read()
        if event is grpc.aio.EOF:
            raise StopAsyncIteration
        return self._received(event)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncClient(
    rq.ClientCore[
        AsyncEventStream,
        Awaitable[session_pb2.ListSessionsResponse],
        AsyncIterator[session_pb2.Session],
        Awaitable[session_pb2.InputResolved],
        Awaitable[Path],
        inputs.AsyncToolCallHandler,
        inputs.AsyncPermissionHandler,
        inputs.AsyncQuestionHandler,
    ]
):
    """An asyncio agentplane client; the same methods as :class:`Client`, awaitable
    (``run``, ``stream_session`` and ``iter_sessions`` are iterated with ``async for``).

    ``target``, ``token``, ``secure``, ``root_certificates``, ``certificate_chain``,
    ``private_key``, ``server_name``, ``timeout`` and ``options`` are those of
    :class:`Client` (several replicas: health-checked ``round_robin``; UNAVAILABLE
    retried; TLS and mTLS). Create it inside the event loop that uses it (grpc.aio binds
    a channel to its loop); use it as an async context manager, or await :meth:`close`.
    """

    _grpc = grpc.aio

    # -- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channels (calls in flight are cancelled)."""
        await self._channel.close()
        if self._admission_channel is not self._channel:
            await self._admission_channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- how a call is made ------------------------------------------------------------

    async def _call(
        self, method: Callable[..., Any], build: rq.Build, pick: rq.Pick = rq.same
    ) -> Any:
        with rpc_errors():
            return pick(await self._send(method, build))

    def _stream(self, call: Any, handlers: inputs.Handlers | None) -> AsyncEventStream:
        return AsyncEventStream(
            call,
            handlers,
            lambda message: self._call(self._sessions.Respond, lambda: message),
        )

    async def _pages(self, pager: rq.Pager) -> AsyncIterator[session_pb2.Session]:
        while (request := pager.next_request()) is not None:
            page = await self._call(self._sessions.ListSessions, lambda: request)
            for session in pager.take(page):
                yield session

    async def _download(
        self, session_id: values.SessionId, path: str, target: Path, timeout: float | None
    ) -> Path:
        data = await self.get_artifact(session_id, path, timeout=timeout)
        return await asyncio.to_thread(files.write_file, target, data)

    # -- calls -------------------------------------------------------------------------

    async def run_for_result(
        self, prompt: str, output_schema: files.SchemaLike, **kwargs: Any
    ) -> Any:
        """Run a session to its end and return its structured result, parsed; see
        :meth:`Client.run_for_result` (:class:`SessionFailed` if it ended ERROR)."""
        final: session_pb2.Session | None = None
        async with self.run(prompt, output_schema=output_schema, **kwargs) as stream:
            async for event in stream:
                if event.HasField("result"):
                    final = event.result.session
        return files.result_of(final)

    async def get_session(self, session_id: values.SessionId) -> session_pb2.Session:
        """One session of the caller's tenant."""
        request = session_pb2.GetSessionRequest(session_id=str(session_id))
        return await self._call(self._sessions.GetSession, lambda: request)

    async def cancel_session(self, session_id: values.SessionId) -> session_pb2.Session:
        """Cancel a session; returns it in its terminal state."""
        request = session_pb2.CancelSessionRequest(session_id=str(session_id))
        return await self._call(self._sessions.CancelSession, lambda: request)

    async def delete_session(self, session_id: values.SessionId) -> None:
        """Delete an ended session; see :meth:`Client.delete_session`."""
        request = session_pb2.DeleteSessionRequest(session_id=str(session_id))
        await self._call(self._sessions.DeleteSession, lambda: request)

    async def list_artifacts(self, session_id: values.SessionId) -> list[session_pb2.Artifact]:
        """The files an ended session created or changed; see
        :meth:`Client.list_artifacts`."""
        request = session_pb2.ListArtifactsRequest(session_id=str(session_id))
        return list((await self._call(self._sessions.ListArtifacts, lambda: request)).artifacts)

    async def get_artifact(
        self, session_id: values.SessionId, path: str, *, timeout: float | None = None
    ) -> bytes:
        """One kept artifact's content, its chunks checked; see
        :meth:`Client.get_artifact`."""
        call, assembler = self._artifact_call(session_id, path, timeout)
        with rpc_errors(call):
            async for chunk in call:
                assembler.add(chunk)
        return assembler.content()

    async def get_budget(self, date: str | dt.date | None = None) -> budget_pb2.Budget:
        """The tenant's budget window for ``date`` ("YYYY-MM-DD" or a date; None: today)."""
        return await self._call(self._budgets.GetBudget, lambda: rq.budget_request(date))

    async def get_usage(
        self, *, start_time: values.Time | None = None, end_time: values.Time | None = None
    ) -> usage_pb2.Usage:
        """The tenant's usage over [start_time, end_time)."""
        return await self._call(
            self._usage.GetUsage, lambda: rq.usage_request(start_time, end_time)
        )

    async def health(self, service: str = "") -> HealthStatus:
        """grpc.health.v1 Check for ``service`` ("" is the server as a whole; over several
        replicas, one that is ready answers)."""
        return await self._call(self._health_check, lambda: service)
