"""The client core that :class:`Client` and :class:`AsyncClient` share, as httpx's
``BaseClient`` serves its two clients: the channel and its metadata, every request built
from Python values with its options checked, and what each call returns. A client adds
only how a call is made: blocking (``_client.py``) or awaited (``_async_client.py``).

A new RunSession option touches the proto, :func:`run_request` and :meth:`ClientCore.run`
here, and the CLI.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

from . import _channel
from . import _files as files
from . import _inputs as inputs
from . import _values as values
from ._channel import ChannelOptions, Target
from ._health import CHECK_METHOD, decode_response, encode_request
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

TOKEN_ENV = "AGENTPLANE_TOKEN"


def resolve_token(token: str | None) -> str | None:
    """The token argument, else ``$AGENTPLANE_TOKEN``, else None (dev-mode servers)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# -- requests -----------------------------------------------------------------------------


def run_request(
    prompt: str,
    *,
    max_budget_usd: values.Money | None = None,
    max_turns: int | None = None,
    allowed_tools: Sequence[str] | None = None,
    model: str | None = None,
    labels: Mapping[str, str] | None = None,
    request_id: values.SessionId | None = None,
    on_disconnect_: values.DisconnectLike | None = None,
    resume_session_id: values.SessionId | None = None,
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
    on_budget_exhausted_: values.ExhaustedLike | None = None,
) -> session_pb2.RunSessionRequest:
    request = session_pb2.RunSessionRequest(
        prompt=prompt,
        request_id=str(request_id) if request_id is not None else "",
        max_budget_usd=values.money(max_budget_usd),
        max_turns=max_turns or 0,
        allowed_tools=values.strings("allowed_tools", allowed_tools),
        model=model or "",
        labels=dict(labels or {}),
        on_disconnect=values.on_disconnect(on_disconnect_),  # type: ignore[arg-type]
        resume_session_id=str(resume_session_id) if resume_session_id is not None else "",
        tools=inputs.caller_tools(tools),
        require_approval=values.strings("require_approval", require_approval),
        output_schema_json=files.output_schema_json(output_schema),
        input_files=files.input_files(input_files),
        include_partial_messages=include_partial_messages,
        effort=effort or "",
        max_thinking_tokens=max_thinking_tokens or 0,
        fallback_model=fallback_model or "",
        callback_url=callback_url or "",
        on_budget_exhausted=values.on_budget_exhausted(on_budget_exhausted_),  # type: ignore[arg-type]
    )
    timeout = inputs.duration(answer_timeout)
    if timeout is not None:
        request.answer_timeout.CopyFrom(timeout)
    return request


def list_request(
    page_size: int,
    page_token: str,
    state: values.StateLike | None,
    labels: Mapping[str, str] | None,
    create_time_start: values.Time | None,
    create_time_end: values.Time | None,
    awaiting: bool,
    paused: bool = False,
) -> session_pb2.ListSessionsRequest:
    request = session_pb2.ListSessionsRequest(
        awaiting=awaiting,
        paused=paused,
        page_size=page_size,
        page_token=page_token,
        state=values.session_state(state),  # type: ignore[arg-type]
        labels=dict(labels or {}),
    )
    start, end = values.timestamp(create_time_start), values.timestamp(create_time_end)
    if start is not None:
        request.create_time_start.CopyFrom(start)
    if end is not None:
        request.create_time_end.CopyFrom(end)
    return request


def budget_update_request(
    session_id: values.SessionId, max_budget_usd: values.Money
) -> session_pb2.UpdateSessionBudgetRequest:
    return session_pb2.UpdateSessionBudgetRequest(
        session_id=values.session_id(session_id), max_budget_usd=values.money(max_budget_usd)
    )


def deliveries_request(
    page_size: int,
    page_token: str,
    session_id: values.SessionId | None,
    state: int | str | None,
    event: str,
) -> webhook_pb2.ListWebhookDeliveriesRequest:
    return webhook_pb2.ListWebhookDeliveriesRequest(
        page_size=page_size,
        page_token=page_token,
        session_id=str(session_id) if session_id is not None else "",
        state=values.delivery_state(state),  # type: ignore[arg-type]
        event=event,
    )


def budget_request(date: str | dt.date | None) -> budget_pb2.GetBudgetRequest:
    if isinstance(date, dt.datetime):
        date = date.date()
    if isinstance(date, dt.date):
        date = date.isoformat()
    return budget_pb2.GetBudgetRequest(date=date or "")


def usage_request(
    start_time: values.Time | None, end_time: values.Time | None
) -> usage_pb2.GetUsageRequest:
    request = usage_pb2.GetUsageRequest()
    start, end = values.timestamp(start_time), values.timestamp(end_time)
    if start is not None:
        request.start_time.CopyFrom(start)
    if end is not None:
        request.end_time.CopyFrom(end)
    return request


class Pager:
    """The ListSessions requests of one ``iter_sessions`` (at most ``limit`` sessions, in
    pages of ``page_size``) and the sessions of each page it yields."""

    def __init__(
        self,
        build: Callable[[int, str], session_pb2.ListSessionsRequest],
        page_size: int,
        limit: int | None,
    ) -> None:
        self._build = build
        self._limit = limit
        self._size = page_size if limit is None else max(1, min(page_size, limit))
        self._token: str | None = ""
        self._count = 0

    def next_request(self) -> session_pb2.ListSessionsRequest | None:
        """The next page's request; None when the last page was read or the limit met."""
        if self._token is None or (self._limit is not None and self._count >= self._limit):
            return None
        return self._build(self._size, self._token)

    def take(self, page: session_pb2.ListSessionsResponse) -> list[session_pb2.Session]:
        """The sessions of ``page`` to yield (up to the limit)."""
        left = None if self._limit is None else self._limit - self._count
        sessions = list(page.sessions[:left])
        self._count += len(sessions)
        self._token = page.next_page_token or None
        return sessions


# -- the core of both clients ---------------------------------------------------------------

Build: TypeAlias = Callable[[], Any]  # makes a call's request
Pick: TypeAlias = Callable[[Any], Any]  # what a method returns of the response


def same(response: Any) -> Any:
    return response


# What a method returns, per client: the value itself (Client) or an awaitable (AsyncClient).
StreamT = TypeVar("StreamT")  # EventStream | AsyncEventStream
PageT = TypeVar("PageT")  # a ListSessionsResponse
SessionsT = TypeVar("SessionsT")  # an Iterator or AsyncIterator of Sessions
ResolvedT = TypeVar("ResolvedT")  # an InputResolved
PathT = TypeVar("PathT")  # the Path of a downloaded artifact
# The handlers a client's run takes: plain functions (Client), or coroutine functions too.
ToolCallT = TypeVar("ToolCallT", bound=Callable[[inputs.ToolCall], Any])
PermissionT = TypeVar("PermissionT", bound=Callable[[inputs.PermissionRequest], Any])
QuestionT = TypeVar("QuestionT", bound=Callable[[inputs.QuestionRequest], Any])


class ClientCore(
    Generic[StreamT, PageT, SessionsT, ResolvedT, PathT, ToolCallT, PermissionT, QuestionT]
):
    """The channel, stubs and metadata of a client, and the methods whose requests take
    options; a subclass says how a call is made (:meth:`_call`, :meth:`_stream`,
    :meth:`_pages`) and adds the short methods, blocking or awaited."""

    # grpc (blocking) or grpc.aio: where the client's channel comes from.
    _grpc: ClassVar[Any]

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
        self._metadata = auth_metadata(resolve_token(token))
        credentials = make_credentials(secure, root_certificates, certificate_chain, private_key)
        given = [*(options or ()), *tls_options(server_name, credentials)]

        def channel(admission: bool) -> Any:
            opts = _channel.channel_options(self.balanced, given, admission=admission)
            if credentials is None:
                return self._grpc.insecure_channel(self.target, options=opts)
            return self._grpc.secure_channel(self.target, credentials, options=opts)

        self._channel = channel(admission=False)
        # RunSession's own channel, balanced over the replicas with room (_channel.py).
        self._admission_channel = channel(admission=True) if self.balanced else self._channel
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._admissions = session_pb2_grpc.SessionServiceStub(self._admission_channel)
        self._budgets = budget_pb2_grpc.BudgetServiceStub(self._channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(self._channel)
        self._webhooks = webhook_pb2_grpc.WebhookServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            CHECK_METHOD, request_serializer=encode_request, response_deserializer=decode_response
        )

    # -- how a call is made (per client) -------------------------------------------------

    def _call(self, method: Callable[..., Any], build: Build, pick: Pick = same) -> Any:
        """Call the unary ``method`` with the request ``build()`` makes (when the call is
        made: an awaited one builds it when awaited) and return ``pick(response)``."""
        raise NotImplementedError

    def _send(self, method: Callable[..., Any], build: Build) -> Any:
        """What ``method`` answers (an awaitable over grpc.aio) for the request built."""
        return method(build(), metadata=self._metadata, timeout=self.timeout)

    def _stream(self, call: Any, handlers: inputs.Handlers | None) -> StreamT:
        """The event stream of a RunSession or StreamSession call."""
        raise NotImplementedError

    def _pages(self, pager: Pager) -> SessionsT:
        """The sessions of each page ``pager`` asks for, fetched as iterated."""
        raise NotImplementedError

    def _download(
        self, session_id: values.SessionId, path: str, target: Path, timeout: float | None
    ) -> PathT:
        """Write the artifact's content to ``target``."""
        raise NotImplementedError

    # -- the methods whose requests take options (the same in both clients) ------------

    def run(
        self,
        prompt: str,
        *,
        max_budget_usd: values.Money | None = None,
        max_turns: int | None = None,
        allowed_tools: Sequence[str] | None = None,
        model: str | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: values.SessionId | None = None,
        on_disconnect: values.DisconnectLike | None = None,
        resume_session_id: values.SessionId | None = None,
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
        on_budget_exhausted: values.ExhaustedLike | None = None,
        on_tool_call: ToolCallT | None = None,
        on_permission: PermissionT | None = None,
        on_question: QuestionT | None = None,
        timeout: float | None = None,
    ) -> StreamT:
        """Start a session and stream its events (``started`` first, ``result`` last).

        A session that fails after admission still ends with a ``result`` event (state
        ERROR); errors before admission raise :class:`RPCError` on the first ``next()``.
        Not a coroutine in :class:`AsyncClient` either: ``async for event in
        client.run(...)``.

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
        answer that comes after the request was settled is dropped. AsyncClient's
        handlers may be coroutine functions or plain functions (a plain one runs on the
        event loop: keep it quick); requests are answered one at a time, in the order
        they arrive.

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
        request = run_request(
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
        call = self._admissions.RunSession(request, metadata=self._metadata, timeout=timeout)
        return self._stream(call, inputs.Handlers(on_tool_call, on_permission, on_question))

    def stream_session(
        self, session_id: values.SessionId, after_seq: int = 0, *, timeout: float | None = None
    ) -> StreamT:
        """Replay a session's events after ``after_seq``, then follow it to its end."""
        request = session_pb2.StreamSessionRequest(
            session_id=values.session_id(session_id), after_seq=after_seq
        )
        call = self._sessions.StreamSession(request, metadata=self._metadata, timeout=timeout)
        return self._stream(call, None)

    def respond(
        self,
        session_id: values.SessionId,
        request_id: str,
        *,
        tool_result: inputs.ToolResultLike | None = None,
        permission: inputs.DecisionLike | None = None,
        answers: inputs.AnswersLike | None = None,
    ) -> ResolvedT:
        """Answer one ``input_request`` of a running session (give exactly one of
        ``tool_result``, ``permission`` or ``answers``, of the request's kind, as the
        handlers of :meth:`run` return them); returns how it was settled. Errors: an
        answer of the wrong kind is INVALID_ARGUMENT; one that comes too late (answered,
        timed out) FAILED_PRECONDITION with ``reason`` ALREADY_ANSWERED, after the
        session's end SESSION_ENDED."""
        return self._call(
            self._sessions.Respond,
            lambda: inputs.respond_request(
                values.session_id(session_id),
                request_id,
                tool_result_=tool_result,
                permission=permission,
                answers_=answers,
            ),
            lambda response: response.resolved,
        )

    def list_sessions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: values.StateLike | None = None,
        labels: Mapping[str, str] | None = None,
        create_time_start: values.Time | None = None,
        create_time_end: values.Time | None = None,
        awaiting: bool = False,
        paused: bool = False,
    ) -> PageT:
        """One page of sessions, newest first (``page_size`` 0: the server's default, 50);
        ``awaiting``: only sessions waiting for their caller; ``paused``: only sessions
        paused at their budget."""
        return self._call(
            self._sessions.ListSessions,
            lambda: list_request(
                page_size,
                page_token,
                state,
                labels,
                create_time_start,
                create_time_end,
                awaiting,
                paused,
            ),
        )

    def iter_sessions(
        self,
        *,
        page_size: int = 100,
        limit: int | None = None,
        state: values.StateLike | None = None,
        labels: Mapping[str, str] | None = None,
        create_time_start: values.Time | None = None,
        create_time_end: values.Time | None = None,
        awaiting: bool = False,
        paused: bool = False,
    ) -> SessionsT:
        """Every matching session, newest first, fetching pages as needed (at most
        ``limit``)."""

        def build(size: int, token: str) -> session_pb2.ListSessionsRequest:
            return list_request(
                size, token, state, labels, create_time_start, create_time_end, awaiting, paused
            )

        return self._pages(Pager(build, page_size, limit))

    def update_session_budget(
        self, session_id: values.SessionId, max_budget_usd: values.Money
    ) -> Any:
        """Raise a session's budget (a paused one goes on, on whichever replica runs it);
        returns the session (awaitable in :class:`AsyncClient`). Errors: lowering it is
        INVALID_ARGUMENT; above the tenant's per-session maximum FAILED_PRECONDITION
        (``reason`` SESSION_BUDGET_MAX); past the day's window RESOURCE_EXHAUSTED
        (BUDGET_EXCEEDED); an ended session FAILED_PRECONDITION (SESSION_ENDED)."""
        return self._call(
            self._sessions.UpdateSessionBudget,
            lambda: budget_update_request(session_id, max_budget_usd),
        )

    def list_webhook_deliveries(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        session_id: values.SessionId | None = None,
        state: int | str | None = None,
        event: str = "",
    ) -> Any:
        """One page of the tenant's webhook deliveries (a ListWebhookDeliveriesResponse),
        newest first, each with its attempts; filtered by session, ``state`` ("pending",
        "delivered", "failed") or ``event`` ("session.ended", ...)."""
        return self._call(
            self._webhooks.ListWebhookDeliveries,
            lambda: deliveries_request(page_size, page_token, session_id, state, event),
        )

    def download_artifact(
        self,
        session_id: values.SessionId,
        path: str,
        dest: files.Destination,
        *,
        timeout: float | None = None,
    ) -> PathT:
        """Download an artifact to ``dest`` (a file, replaced atomically, or a directory to
        put it in under its own name); returns the file written. Errors as
        :meth:`get_artifact`; nothing is written when it fails."""
        return self._download(session_id, path, files.destination(dest, path), timeout)

    # -- for the short methods ---------------------------------------------------------

    def _artifact_call(
        self, session_id: values.SessionId, path: str, timeout: float | None
    ) -> tuple[Any, files.ArtifactAssembler]:
        """A started GetArtifact call and the assembler that checks its chunks."""
        sid = values.session_id(session_id)
        request = session_pb2.GetArtifactRequest(session_id=sid, path=path)
        call = self._sessions.GetArtifact(
            request, metadata=self._metadata, timeout=self.timeout if timeout is None else timeout
        )
        return call, files.ArtifactAssembler(sid, path)
