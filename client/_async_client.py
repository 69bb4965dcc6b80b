"""The asyncio client, over grpc.aio."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

from . import _channel
from . import _files as files
from . import _inputs as inputs
from . import _requests as rq
from ._channel import ChannelOptions, Target
from ._errors import AgentplaneError, RPCError
from ._health import CHECK_METHOD, HealthStatus, decode_response, encode_request
from ._tls import make_credentials, tls_options
from .v1 import (
    budget_pb2,
    budget_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

T = TypeVar("T")


class AsyncEventStream(AsyncIterator[session_pb2.SessionEvent]):
    """The events of one RunSession / StreamSession call, in order.

    ``async for`` over it; errors surface as :class:`RPCError`. ``cancel()`` (or leaving
    an ``async with`` block) ends the call — for RunSession that is a disconnect, which
    cancels the session unless it was started with ``on_disconnect="continue"``.

    With handlers, an ``input_request`` event is yielded first; when the next event is
    asked for, its handler is awaited (a plain function is called) and its answer sent
    with Respond before the stream is read on.
    """

    def __init__(
        self,
        call: Any,
        handlers: inputs.Handlers | None = None,
        respond: Callable[[session_pb2.RespondRequest], Awaitable[Any]] | None = None,
    ) -> None:
        self._call = call
        self._handlers = handlers or inputs.Handlers()
        self._respond = respond
        self._pending: inputs.AnyRequest | None = None

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> session_pb2.SessionEvent:
        if self._pending is not None:
            request, self._pending = self._pending, None
            await self._answer(request)
        try:
            event = await self._call.read()
        except grpc.RpcError as exc:
            raise RPCError.from_grpc(exc) from exc
        if event is grpc.aio.EOF:
            raise StopAsyncIteration
        if self._handlers:
            self._pending = self._handlers.pending(event)
        return event  # type: ignore[no-any-return]

    async def _answer(self, request: inputs.AnyRequest) -> None:
        handler = self._handlers.handler(request)
        assert handler is not None and self._respond is not None
        message = await inputs.handle_async(request, handler)
        if message is None:
            return
        try:
            await self._respond(message)
        except RPCError as exc:
            if not inputs.settled_elsewhere(exc, request):
                raise

    def cancel(self) -> None:
        """End the call (a no-op once it has finished)."""
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncClient:
    """An asyncio agentplane client; the same methods as :class:`Client`, awaitable.

    ``target``, ``token``, ``secure``, ``root_certificates``, ``certificate_chain``,
    ``private_key``, ``server_name``, ``timeout`` and ``options`` are those of
    :class:`Client` (several replicas: health-checked ``round_robin``; UNAVAILABLE
    retried; TLS and mTLS). Create it inside the event loop that uses it (grpc.aio binds
    a channel to its loop); use it as an async context manager, or await :meth:`close`.
    """

    def __init__(
        self,
        target: Target | None = None,
        *,
        token: str | None = None,
        secure: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
        options: ChannelOptions | None = None,
    ) -> None:
        self.target, self.balanced = _channel.resolve(target)
        self.timeout = timeout
        self._metadata = rq.auth_metadata(rq.resolve_token(token))
        credentials = make_credentials(secure, root_certificates, certificate_chain, private_key)
        opts = _channel.channel_options(
            self.balanced, [*(options or ()), *tls_options(server_name, credentials)]
        )
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=opts)
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._budgets = budget_pb2_grpc.BudgetServiceStub(self._channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(self._channel)
        self._webhooks = webhook_pb2_grpc.WebhookServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            CHECK_METHOD, request_serializer=encode_request, response_deserializer=decode_response
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- calls -------------------------------------------------------------------------

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise RPCError.from_grpc(exc) from exc

    def run(
        self,
        prompt: str,
        *,
        max_budget_usd: rq.Money | None = None,
        max_turns: int | None = None,
        allowed_tools: Sequence[str] | None = None,
        model: str | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | uuid.UUID | None = None,
        on_disconnect: rq.DisconnectLike | None = None,
        resume_session_id: str | uuid.UUID | None = None,
        tools: Sequence[inputs.ToolLike] | None = None,
        require_approval: Sequence[str] | None = None,
        answer_timeout: inputs.Seconds | None = None,
        output_schema: files.SchemaLike | None = None,
        input_files: files.InputFilesLike | None = None,
        include_partial_messages: bool = False,
        effort: str | None = None,
        max_thinking_tokens: int | None = None,
        fallback_model: str | None = None,
        callback_url: str | None = None,
        on_budget_exhausted: rq.ExhaustedLike | None = None,
        on_tool_call: inputs.AsyncToolCallHandler | None = None,
        on_permission: inputs.AsyncPermissionHandler | None = None,
        on_question: inputs.AsyncQuestionHandler | None = None,
        timeout: float | None = None,
    ) -> AsyncEventStream:
        """Start a session and stream its events (``started`` first, ``result`` last).

        Not a coroutine: ``async for event in client.run(...)``. A session that fails after
        admission still ends with a ``result`` event (state ERROR); errors before admission
        raise :class:`RPCError` from the first iteration.

        ``tools``, ``require_approval``, ``answer_timeout`` and the handlers are those of
        :meth:`Client.run`; handlers may be coroutine functions or plain functions (a
        plain one runs on the event loop: keep it quick). Requests are answered one at a
        time, in the order they arrive. ``output_schema``, ``input_files``,
        ``callback_url`` and ``on_budget_exhausted`` are those of :meth:`Client.run`.
        """
        request = rq.run_request(
            prompt,
            max_budget_usd=max_budget_usd,
            max_turns=max_turns,
            allowed_tools=allowed_tools,
            model=model,
            labels=labels,
            request_id=request_id,
            on_disconnect_=on_disconnect,
            resume_session_id=resume_session_id,
            tools=tools,
            require_approval=require_approval,
            answer_timeout=answer_timeout,
            output_schema=output_schema,
            input_files=input_files,
            include_partial_messages=include_partial_messages,
            effort=effort,
            max_thinking_tokens=max_thinking_tokens,
            fallback_model=fallback_model,
            callback_url=callback_url,
            on_budget_exhausted_=on_budget_exhausted,
        )
        handlers = inputs.Handlers(on_tool_call, on_permission, on_question)
        return AsyncEventStream(
            self._sessions.RunSession(request, metadata=self._metadata, timeout=timeout),
            handlers,
            lambda message: self._unary(self._sessions.Respond, message),
        )

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
        if final is None:
            raise AgentplaneError("the session's event stream ended without a result")
        return files.result_of(final)

    async def respond(
        self,
        session_id: str | uuid.UUID,
        request_id: str,
        *,
        tool_result: inputs.ToolResultLike | None = None,
        permission: inputs.DecisionLike | None = None,
        answers: inputs.AnswersLike | None = None,
    ) -> session_pb2.InputResolved:
        """Answer one ``input_request`` of a running session; see :meth:`Client.respond`."""
        message = inputs.respond_request(
            rq.session_id(session_id),
            request_id,
            tool_result_=tool_result,
            permission=permission,
            answers_=answers,
        )
        return (await self._unary(self._sessions.Respond, message)).resolved

    def stream_session(
        self, session_id: str | uuid.UUID, after_seq: int = 0, *, timeout: float | None = None
    ) -> AsyncEventStream:
        """Replay a session's events after ``after_seq``, then follow it to its end."""
        request = session_pb2.StreamSessionRequest(
            session_id=rq.session_id(session_id), after_seq=after_seq
        )
        return AsyncEventStream(
            self._sessions.StreamSession(request, metadata=self._metadata, timeout=timeout)
        )

    async def get_session(self, session_id: str | uuid.UUID) -> session_pb2.Session:
        """One session of the caller's tenant."""
        request = session_pb2.GetSessionRequest(session_id=rq.session_id(session_id))
        return await self._unary(self._sessions.GetSession, request)

    async def list_sessions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: rq.StateLike | None = None,
        labels: Mapping[str, str] | None = None,
        create_time_start: rq.Time | None = None,
        create_time_end: rq.Time | None = None,
        awaiting: bool = False,
        paused: bool = False,
    ) -> session_pb2.ListSessionsResponse:
        """One page of sessions, newest first (``page_size`` 0: the server's default, 50);
        ``awaiting``: only sessions waiting for their caller."""
        request = rq.list_request(
            page_size=page_size,
            page_token=page_token,
            state=state,
            labels=labels,
            create_time_start=create_time_start,
            create_time_end=create_time_end,
            awaiting=awaiting,
            paused=paused,
        )
        return await self._unary(self._sessions.ListSessions, request)

    async def iter_sessions(
        self,
        *,
        page_size: int = 100,
        limit: int | None = None,
        state: rq.StateLike | None = None,
        labels: Mapping[str, str] | None = None,
        create_time_start: rq.Time | None = None,
        create_time_end: rq.Time | None = None,
        awaiting: bool = False,
        paused: bool = False,
    ) -> AsyncIterator[session_pb2.Session]:
        """Every matching session, newest first, fetching pages as needed (at most
        ``limit``)."""
        token, count = "", 0
        size = page_size if limit is None else max(1, min(page_size, limit))
        while limit is None or count < limit:
            page = await self.list_sessions(
                page_size=size,
                page_token=token,
                state=state,
                labels=labels,
                create_time_start=create_time_start,
                create_time_end=create_time_end,
                awaiting=awaiting,
                paused=paused,
            )
            for session in page.sessions[: None if limit is None else limit - count]:
                count += 1
                yield session
            token = page.next_page_token
            if not token:
                return

    async def cancel_session(self, session_id: str | uuid.UUID) -> session_pb2.Session:
        """Cancel a session; returns it in its terminal state."""
        request = session_pb2.CancelSessionRequest(session_id=rq.session_id(session_id))
        return await self._unary(self._sessions.CancelSession, request)

    async def update_session_budget(
        self, session_id: str | uuid.UUID, max_budget_usd: rq.Money
    ) -> session_pb2.Session:
        """Raise a session's budget; see :meth:`Client.update_session_budget`."""
        request = rq.budget_update_request(session_id, max_budget_usd)
        return await self._unary(self._sessions.UpdateSessionBudget, request)

    async def list_webhook_deliveries(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        session_id: str | uuid.UUID | None = None,
        state: int | str | None = None,
        event: str = "",
    ) -> webhook_pb2.ListWebhookDeliveriesResponse:
        """One page of webhook deliveries; see :meth:`Client.list_webhook_deliveries`."""
        request = rq.deliveries_request(
            page_size=page_size,
            page_token=page_token,
            session_id_=session_id,
            state=state,
            event=event,
        )
        return await self._unary(self._webhooks.ListWebhookDeliveries, request)

    async def delete_session(self, session_id: str | uuid.UUID) -> None:
        """Delete an ended session; see :meth:`Client.delete_session`."""
        request = session_pb2.DeleteSessionRequest(session_id=rq.session_id(session_id))
        await self._unary(self._sessions.DeleteSession, request)

    async def list_artifacts(self, session_id: str | uuid.UUID) -> list[session_pb2.Artifact]:
        """The files an ended session created or changed; see
        :meth:`Client.list_artifacts`."""
        request = session_pb2.ListArtifactsRequest(session_id=rq.session_id(session_id))
        return list((await self._unary(self._sessions.ListArtifacts, request)).artifacts)

    async def get_artifact(
        self, session_id: str | uuid.UUID, path: str, *, timeout: float | None = None
    ) -> bytes:
        """One kept artifact's content, its chunks checked; see
        :meth:`Client.get_artifact`."""
        sid = rq.session_id(session_id)
        request = session_pb2.GetArtifactRequest(session_id=sid, path=path)
        assembler = files.ArtifactAssembler(sid, path)
        call = self._sessions.GetArtifact(
            request, metadata=self._metadata, timeout=self.timeout if timeout is None else timeout
        )
        try:
            async for chunk in call:
                assembler.add(chunk)
        except grpc.RpcError as exc:
            raise RPCError.from_grpc(exc) from exc
        finally:
            call.cancel()
        return assembler.content()

    async def download_artifact(
        self,
        session_id: str | uuid.UUID,
        path: str,
        dest: str | os.PathLike[str],
        *,
        timeout: float | None = None,
    ) -> Path:
        """Download an artifact to ``dest`` (a file or a directory); returns the file
        written. See :meth:`Client.download_artifact`."""
        data = await self.get_artifact(session_id, path, timeout=timeout)
        return await asyncio.to_thread(files.write_file, files.destination(dest, path), data)

    async def get_budget(self, date: str | dt.date | None = None) -> budget_pb2.Budget:
        """The tenant's budget window for ``date`` ("YYYY-MM-DD" or a date; None: today)."""
        return await self._unary(self._budgets.GetBudget, rq.budget_request(date))

    async def get_usage(
        self, *, start_time: rq.Time | None = None, end_time: rq.Time | None = None
    ) -> usage_pb2.Usage:
        """The tenant's usage over [start_time, end_time)."""
        return await self._unary(self._usage.GetUsage, rq.usage_request(start_time, end_time))

    async def health(self, service: str = "") -> HealthStatus:
        """grpc.health.v1 Check for ``service`` ("" is the server as a whole; over several
        replicas, one that is ready answers)."""
        return await self._unary(self._health_check, service)
