"""The server span of each gRPC call, and what the API adds to it about its session.

`ServerSpans` is our own interceptor rather than opentelemetry-instrumentation-grpc's:
that one records every call that ends with an error status (grpc.aio ends them by
raising AbortError) as two "AbortError: Locally aborted." exception events with a stack
trace, and leaves the reason in the status details. Here a call's span gets its gRPC code,
status ERROR with the status message, and `error.type` = the ErrorInfo reason
(BUDGET_EXCEEDED, UNKNOWN_MODEL, ...); only an exception that escaped a handler is
recorded as an exception event, once.

`CallSpans` is what the API tells the current call's span: the caller's tenant, the
session the call is about (with a link to the trace it was admitted in), and how it
ended, in the attributes OpenInference viewers (Phoenix, ...) list traces by.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ..domain import Event, EventKind, Session, SessionState
from .guard import never_raises
from .setup import ContentPolicy
from .tracing import (
    CONVERSATION_ID,
    ERROR_TYPE,
    SESSION_ID,
    SESSION_STATE,
    TENANT,
    USER_ID,
    label_attributes,
)

# OpenInference (what LLM trace viewers key their lists on).
SPAN_KIND = "openinference.span.kind"
CHAIN = "CHAIN"  # OpenInference's kind for the entry point of a request
INPUT_VALUE = "input.value"
INPUT_MIME_TYPE = "input.mime_type"
OUTPUT_VALUE = "output.value"
OUTPUT_MIME_TYPE = "output.mime_type"
# RPC conventions (as opentelemetry-instrumentation-grpc names them).
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_STATUS_CODE = "rpc.grpc.status_code"
PEER_ADDRESS = "network.peer.address"
PEER_PORT = "network.peer.port"

_STATUS_DETAILS = "grpc-status-details-bin"


def _peer(peer: str) -> dict[str, Any]:
    """`ipv4:127.0.0.1:5555` / `ipv6:[::1]:5555` as address and port (unix: none)."""
    family, _, rest = peer.partition(":")
    if family not in ("ipv4", "ipv6") or ":" not in rest:
        return {}
    address, _, port = unquote(rest).rpartition(":")
    return {PEER_ADDRESS: address.strip("[]"), PEER_PORT: int(port) if port.isdigit() else port}


def _reason(context: grpc.aio.ServicerContext) -> str | None:
    """The ErrorInfo reason of the status a call was aborted with, if it has one."""
    for key, value in context.trailing_metadata() or ():
        if key == _STATUS_DETAILS and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return None


class _Call:
    """One call's server span: opened at the start, closed with the call's code."""

    def __init__(
        self, tracer: trace.Tracer, method: str, context: grpc.aio.ServicerContext
    ) -> None:
        carrier = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        service, _, name = method.lstrip("/").partition("/")
        self.context = context
        self.span = tracer.start_span(
            method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={
                RPC_SYSTEM: "grpc",
                RPC_SERVICE: service,
                RPC_METHOD: name,
                SPAN_KIND: CHAIN,
                **_peer(context.peer() or ""),
            },
        )

    def end(self, error: BaseException | None = None) -> None:
        span, context = self.span, self.context
        code = context.code() or grpc.StatusCode.OK
        if isinstance(error, grpc.aio.AbortError):
            error = None  # how grpc.aio ends a call with an error status: not an exception
        elif isinstance(error, Exception):  # escaped its handler: grpcio answers UNKNOWN
            code = grpc.StatusCode.UNKNOWN
            span.record_exception(error)
            span.set_attribute(ERROR_TYPE, type(error).__qualname__)
        elif error is not None:  # cancelled: the caller went away, or its deadline passed
            code = grpc.StatusCode.CANCELLED
        span.set_attribute(RPC_STATUS_CODE, code.value[0])
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            if error is None:
                span.set_attribute(ERROR_TYPE, _reason(context) or code.name)
            span.set_status(Status(StatusCode.ERROR, str(context.details() or code.name)[:500]))
        span.end()


class ServerSpans(grpc.aio.ServerInterceptor):
    """A SERVER span per call (continuing the caller's `traceparent`), current while
    its handler runs; calls `skip` says so are not traced (health checks)."""

    def __init__(self, tracer: trace.Tracer, skip: Callable[[str], bool]) -> None:
        self._tracer = tracer
        self._skip = skip

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method  # type: ignore[attr-defined]
        if handler is None or self._skip(method):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap(handler.stream_stream, method),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _wrap(self, behavior: Any, method: str) -> Any:
        """A streaming handler: an async generator, or a coroutine that writes with
        context.write."""
        return (
            self._stream(behavior, method)
            if inspect.isasyncgenfunction(behavior)
            else (self._unary(behavior, method))
        )

    def _unary(self, behavior: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rpc = _Call(self._tracer, method, context)
            with trace.use_span(rpc.span, record_exception=False, set_status_on_exception=False):
                try:
                    result = await behavior(request, context)
                except BaseException as exc:
                    rpc.end(exc)
                    raise
                rpc.end()
                return result

        return call

    def _stream(self, behavior: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            rpc = _Call(self._tracer, method, context)
            with trace.use_span(rpc.span, record_exception=False, set_status_on_exception=False):
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    rpc.end(exc)
                    raise
                rpc.end()

        return call


def _session_link(session: Session) -> SpanContext | None:
    """The span of the call that admitted `session`, if it was traced."""
    try:
        trace_id, span_id = int(session.trace_id, 16), int(session.trace_span_id, 16)
    except ValueError:
        return None
    link = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
    return link if link.is_valid else None


class CallSpans:
    """What the API adds to the span of the call it serves (the current span)."""

    def __init__(self, content: ContentPolicy) -> None:
        self._content = content

    def recording(self) -> bool:
        """Whether the current call's span records (is sampled and exported)."""
        return trace.get_current_span().is_recording()

    @never_raises
    def caller(self, tenant: str) -> None:
        """The call's authenticated tenant."""
        trace.get_current_span().set_attributes({USER_ID: tenant, TENANT: tenant})

    @never_raises
    def session(self, session: Session, prompt: str | None = None) -> None:
        """The call is about `session`: its id, tenant and labels; a link to the call that
        admitted it (when that was another one); RunSession's prompt as `input.value`
        when content is recorded."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes: dict[str, Any] = {
            SESSION_ID: session.id,
            USER_ID: session.tenant,
            TENANT: session.tenant,
            **label_attributes(session.labels),
        }
        if prompt is not None and self._content.capture:
            attributes[INPUT_VALUE] = self._content.cap(prompt)
            attributes[INPUT_MIME_TYPE] = "text/plain"
        span.set_attributes(attributes)
        link = _session_link(session)
        if link is not None and link.span_id != span.get_span_context().span_id:
            span.add_link(link, {SESSION_ID: session.id})

    @never_raises
    def event(self, event: Event) -> None:
        """The call sends one of a session's events: at its `result` the session ended,
        and a failure is the call's ERROR status with the session's reason as
        `error.type`; its result is `output.value` when content is recorded."""
        span = trace.get_current_span()
        if event.kind is not EventKind.RESULT or not span.is_recording():
            return
        session = Session.from_json(event.data["session"])
        span.set_attribute(SESSION_STATE, session.state.value)
        if session.sdk_session_id:
            span.set_attribute(CONVERSATION_ID, session.sdk_session_id)
        if session.state is SessionState.ERROR:
            reason = session.error_reason.value if session.error_reason else "ERROR"
            span.set_attribute(ERROR_TYPE, reason)
            span.set_status(Status(StatusCode.ERROR, f"{reason}: {session.error_message}"[:500]))
        elif self._content.capture and session.result:
            span.set_attributes(
                {
                    OUTPUT_VALUE: self._content.cap(session.result),
                    OUTPUT_MIME_TYPE: "text/plain",
                }
            )
