"""The synchronous client, over grpc's blocking channel."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc

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


class EventStream(Iterator[session_pb2.SessionEvent]):
    """The events of one RunSession / StreamSession call, in order.

    Iterate it; errors surface as :class:`RPCError`. ``cancel()`` (or leaving a ``with``
    block) ends the call — for RunSession that is a disconnect, which cancels the session
    unless it was started with ``on_disconnect="continue"``.

    With handlers (``run(on_tool_call=..., on_permission=..., on_question=...)``), an
    ``input_request`` event is yielded first; when the next event is asked for, its
    handler runs and its answer is sent with Respond before the stream is read on.
    """

    def __init__(
        self,
        call: Any,
        handlers: inputs.Handlers | None = None,
        respond: Callable[[session_pb2.RespondRequest], Any] | None = None,
    ) -> None:
        self._call = call
        self._handlers = handlers or inputs.Handlers()
        self._respond = respond
        self._pending: inputs.AnyRequest | None = None

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> session_pb2.SessionEvent:
        if self._pending is not None:
            request, self._pending = self._pending, None
            self._answer(request)
        try:
            event = next(self._call)
        except grpc.RpcError as exc:
            raise RPCError.from_grpc(exc) from exc
        if self._handlers:
            self._pending = self._handlers.pending(event)
        return event

    def _answer(self, request: inputs.AnyRequest) -> None:
        handler = self._handlers.handler(request)
        assert handler is not None and self._respond is not None
        message = inputs.handle(request, handler)
        if message is None:
            return
        try:
            self._respond(message)
        except RPCError as exc:
            if not inputs.settled_elsewhere(exc, request):
                raise

    def cancel(self) -> None:
        """End the call (a no-op once it has finished)."""
        self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class Client:
    """A blocking agentplane client.

    ``target`` defaults to ``$AGENTPLANE_TARGET`` or ``127.0.0.1:50051``; several replicas
    are a list of ``host:port`` addresses (or one string of them joined with commas) or a
    ``dns:///name:port`` target, and get health-checked ``round_robin`` (see
    :func:`agentplane.service_config`); UNAVAILABLE is retried in any case. ``token``
    defaults to ``$AGENTPLANE_TOKEN`` (sent as ``authorization: Bearer <token>``; none for a
    dev-mode server). ``secure`` (or ``root_certificates``, PEM bytes of the CA to trust
    instead of the system's) selects TLS; ``certificate_chain`` and ``private_key`` (PEM
    bytes) are a client certificate for a server that requires one (mTLS), and
    ``server_name`` the name its certificate must carry when it differs from the target's.
    ``timeout`` is the deadline in seconds of each unary call; streaming calls take their
    own. ``options`` are grpc channel options (a ``grpc.service_config`` there replaces
    agentplane's). Use it as a context manager, or call :meth:`close`.
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
            self._channel = grpc.insecure_channel(self.target, options=opts)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=opts)
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._budgets = budget_pb2_grpc.BudgetServiceStub(self._channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(self._channel)
        self._webhooks = webhook_pb2_grpc.WebhookServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            CHECK_METHOD, request_serializer=encode_request, response_deserializer=decode_response
        )

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- calls -------------------------------------------------------------------------

    def _unary(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
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
        on_tool_call: inputs.ToolCallHandler | None = None,
        on_permission: inputs.PermissionHandler | None = None,
        on_question: inputs.QuestionHandler | None = None,
        timeout: float | None = None,
    ) -> EventStream:
        """Start a session and stream its events (``started`` first, ``result`` last).

        A session that fails after admission still ends with a ``result`` event (state
        ERROR); errors before admission raise :class:`RPCError` on the first ``next()``.

        Callers in the loop: ``tools`` are caller tools (:class:`agentplane.Tool` or dicts
        with ``name``, ``description``, ``input_schema``), ``require_approval`` tool names
        or patterns (``"Bash"``, ``"Bash(git push:*)"``) that need the caller's approval,
        ``answer_timeout`` (seconds or a timedelta) how long the session waits for each
        answer. While iterating, each ``input_request`` is answered by its handler with
        Respond on this channel: ``on_tool_call(call)`` returns a str, a dict (structured
        content) or a :class:`ToolResult` (an exception answers an error result with its
        message); ``on_permission(request)`` returns True/False, :class:`Allow` or
        :class:`Deny`; ``on_question(request)`` returns ``{question: label}``. A request
        with no handler for its kind (or whose handler returns None) is left unanswered:
        answer it with :meth:`respond`, here or on any replica, before its deadline (then
        a tool call fails, an approval is denied, questions go unanswered). A handler's
        answer that comes after the request was settled is dropped.

        Files and results: ``input_files`` (``{path: bytes | str}`` or ``[(path,
        content), ...]``) are written into the workspace before the agent starts;
        ``output_schema`` (a JSON Schema, as a dict or JSON text) makes the session end
        with a structured result matching it (:func:`agentplane.structured_result` parses
        it from the final Session), or ERROR with reason INVALID_OUTPUT. See also
        :meth:`run_for_result`.

        Live text and model knobs: ``include_partial_messages`` streams ``text_delta``
        events as the agent writes (live only, seq 0, never replayed); ``effort``,
        ``max_thinking_tokens`` and ``fallback_model`` within what the tenant allows.

        Hanging up: ``callback_url`` (one of the tenant's ``webhooks.callback_urls``) is
        sent the session's signed webhooks; ``on_budget_exhausted`` ``"pause"`` holds the
        session at its budget (a ``paused`` event, ``Session.paused``) until
        :meth:`update_session_budget` raises it, ``"end"`` ends it there (default: the
        tenant's).
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
        return EventStream(
            self._sessions.RunSession(request, metadata=self._metadata, timeout=timeout),
            handlers,
            lambda message: self._unary(self._sessions.Respond, message),
        )

    def run_for_result(self, prompt: str, output_schema: files.SchemaLike, **kwargs: Any) -> Any:
        """Run a session to its end and return its structured result, parsed (a value
        matching ``output_schema``). ``kwargs`` are those of :meth:`run` (handlers too).

        Raises :class:`SessionFailed` (with the final Session) if the session ended ERROR,
        e.g. reason INVALID_OUTPUT when the agent's result did not match the schema;
        :class:`RPCError` if it was not admitted.
        """
        final: session_pb2.Session | None = None
        with self.run(prompt, output_schema=output_schema, **kwargs) as stream:
            for event in stream:
                if event.HasField("result"):
                    final = event.result.session
        if final is None:
            raise AgentplaneError("the session's event stream ended without a result")
        return files.result_of(final)

    def respond(
        self,
        session_id: str | uuid.UUID,
        request_id: str,
        *,
        tool_result: inputs.ToolResultLike | None = None,
        permission: inputs.DecisionLike | None = None,
        answers: inputs.AnswersLike | None = None,
    ) -> session_pb2.InputResolved:
        """Answer one ``input_request`` of a running session (give exactly one of
        ``tool_result``, ``permission`` or ``answers``, of the request's kind, as the
        handlers of :meth:`run` return them); returns how it was settled. Errors: an
        answer of the wrong kind is INVALID_ARGUMENT; one that comes too late (answered,
        timed out) FAILED_PRECONDITION with ``reason`` ALREADY_ANSWERED, after the
        session's end SESSION_ENDED."""
        message = inputs.respond_request(
            rq.session_id(session_id),
            request_id,
            tool_result_=tool_result,
            permission=permission,
            answers_=answers,
        )
        return self._unary(self._sessions.Respond, message).resolved

    def stream_session(
        self, session_id: str | uuid.UUID, after_seq: int = 0, *, timeout: float | None = None
    ) -> EventStream:
        """Replay a session's events after ``after_seq``, then follow it to its end."""
        request = session_pb2.StreamSessionRequest(
            session_id=rq.session_id(session_id), after_seq=after_seq
        )
        return EventStream(
            self._sessions.StreamSession(request, metadata=self._metadata, timeout=timeout)
        )

    def get_session(self, session_id: str | uuid.UUID) -> session_pb2.Session:
        """One session of the caller's tenant."""
        request = session_pb2.GetSessionRequest(session_id=rq.session_id(session_id))
        return self._unary(self._sessions.GetSession, request)

    def list_sessions(
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
        ``awaiting``: only sessions waiting for their caller; ``paused``: only sessions
        paused at their budget."""
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
        return self._unary(self._sessions.ListSessions, request)

    def iter_sessions(
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
    ) -> Iterator[session_pb2.Session]:
        """Every matching session, newest first, fetching pages as needed (at most
        ``limit``)."""
        token, count = "", 0
        size = page_size if limit is None else max(1, min(page_size, limit))
        while limit is None or count < limit:
            page = self.list_sessions(
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

    def cancel_session(self, session_id: str | uuid.UUID) -> session_pb2.Session:
        """Cancel a session; returns it in its terminal state."""
        request = session_pb2.CancelSessionRequest(session_id=rq.session_id(session_id))
        return self._unary(self._sessions.CancelSession, request)

    def update_session_budget(
        self, session_id: str | uuid.UUID, max_budget_usd: rq.Money
    ) -> session_pb2.Session:
        """Raise a session's budget (a paused one goes on, on whichever replica runs it);
        returns the session. Errors: lowering it is INVALID_ARGUMENT; above the tenant's
        per-session maximum FAILED_PRECONDITION (``reason`` SESSION_BUDGET_MAX); past the
        day's window RESOURCE_EXHAUSTED (BUDGET_EXCEEDED); an ended session
        FAILED_PRECONDITION (SESSION_ENDED)."""
        request = rq.budget_update_request(session_id, max_budget_usd)
        return self._unary(self._sessions.UpdateSessionBudget, request)

    def list_webhook_deliveries(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        session_id: str | uuid.UUID | None = None,
        state: int | str | None = None,
        event: str = "",
    ) -> webhook_pb2.ListWebhookDeliveriesResponse:
        """One page of the tenant's webhook deliveries, newest first, each with its
        attempts; filtered by session, ``state`` ("pending", "delivered", "failed") or
        ``event`` ("session.ended", ...)."""
        request = rq.deliveries_request(
            page_size=page_size,
            page_token=page_token,
            session_id_=session_id,
            state=state,
            event=event,
        )
        return self._unary(self._webhooks.ListWebhookDeliveries, request)

    def delete_session(self, session_id: str | uuid.UUID) -> None:
        """Delete an ended session (its events, transcript and artifacts; its spend stays
        in the budget). FAILED_PRECONDITION while it is IDLE or RUNNING: cancel it first."""
        request = session_pb2.DeleteSessionRequest(session_id=rq.session_id(session_id))
        self._unary(self._sessions.DeleteSession, request)

    def list_artifacts(self, session_id: str | uuid.UUID) -> list[session_pb2.Artifact]:
        """The files an ended session created or changed, by path: kept ones (with size and
        SHA-256) and left-out ones (``omitted_reason`` says why)."""
        request = session_pb2.ListArtifactsRequest(session_id=rq.session_id(session_id))
        return list(self._unary(self._sessions.ListArtifacts, request).artifacts)

    def get_artifact(
        self, session_id: str | uuid.UUID, path: str, *, timeout: float | None = None
    ) -> bytes:
        """One kept artifact's content, its chunks checked (offsets, size, SHA-256;
        :class:`ArtifactError` otherwise). A left-out file is FAILED_PRECONDITION, a missing
        one NOT_FOUND. ``timeout``: the whole download's deadline (default the client's)."""
        sid = rq.session_id(session_id)
        request = session_pb2.GetArtifactRequest(session_id=sid, path=path)
        assembler = files.ArtifactAssembler(sid, path)
        call = self._sessions.GetArtifact(
            request, metadata=self._metadata, timeout=self.timeout if timeout is None else timeout
        )
        try:
            for chunk in call:
                assembler.add(chunk)
        except grpc.RpcError as exc:
            raise RPCError.from_grpc(exc) from exc
        finally:
            call.cancel()
        return assembler.content()

    def download_artifact(
        self,
        session_id: str | uuid.UUID,
        path: str,
        dest: str | os.PathLike[str],
        *,
        timeout: float | None = None,
    ) -> Path:
        """Download an artifact to ``dest`` (a file, replaced atomically, or a directory to
        put it in under its own name); returns the file written. Errors as
        :meth:`get_artifact`; nothing is written when it fails."""
        target = files.destination(dest, path)
        return files.write_file(target, self.get_artifact(session_id, path, timeout=timeout))

    def get_budget(self, date: str | dt.date | None = None) -> budget_pb2.Budget:
        """The tenant's budget window for ``date`` ("YYYY-MM-DD" or a date; None: today)."""
        return self._unary(self._budgets.GetBudget, rq.budget_request(date))

    def get_usage(
        self, *, start_time: rq.Time | None = None, end_time: rq.Time | None = None
    ) -> usage_pb2.Usage:
        """The tenant's usage over [start_time, end_time)."""
        return self._unary(self._usage.GetUsage, rq.usage_request(start_time, end_time))

    def health(self, service: str = "") -> HealthStatus:
        """grpc.health.v1 Check for ``service`` ("" is the server as a whole). Over several
        replicas, a replica that is ready answers; with none ready the call fails
        UNAVAILABLE."""
        return self._unary(self._health_check, service)
