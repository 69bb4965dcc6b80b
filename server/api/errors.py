"""Domain errors -> gRPC statuses with google.rpc rich details (the only such mapping)."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import (
    AgentplaneError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    ReplicaFull,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

log = logging.getLogger(__name__)

DOMAIN = "agentplane.dev"

# The gRPC code of each kind of error (first match wins); the ErrorInfo reason is the
# error's own `reason`, which the admission-rejection metric reads too.
_CODES: list[tuple[type[AgentplaneError], int]] = [
    (InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (Unauthenticated, code_pb2.UNAUTHENTICATED),
    (NotFound, code_pb2.NOT_FOUND),
    (FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (QuotaExceeded, code_pb2.RESOURCE_EXHAUSTED),
    (Unavailable, code_pb2.UNAVAILABLE),
    (Unimplemented, code_pb2.UNIMPLEMENTED),
]


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(exc: AgentplaneError) -> grpc.Status:
    """The rich status for a domain error: ErrorInfo always, BadRequest/QuotaFailure/
    RetryInfo when they apply."""
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), code_pb2.INTERNAL)
    details = []
    if isinstance(exc, QuotaExceeded):
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=exc.subject, description=str(exc)
                        )
                    ]
                )
            )
        )
    if isinstance(exc, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=exc.field, description=exc.description
                        )
                    ]
                )
            )
        )
    if isinstance(exc, ReplicaFull):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(dt.timedelta(seconds=exc.retry_after_s))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    details.insert(0, _pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN)))
    return rpc_status.to_status(status_pb2.Status(code=code, message=str(exc), details=details))


F = TypeVar("F", bound=Callable[..., Any])


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    """End the call with the status for `exc`; anything not ours is INTERNAL, logged."""
    if isinstance(exc, AgentplaneError):
        status = to_status(exc)
        # Told first so that the tracing interceptor's context records the code on its span.
        context.set_code(status.code)
        context.set_details(status.details)
        await context.abort_with_status(status)
    log.error("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def unary(method: F) -> F:
    """Map domain errors raised by a unary handler to rich statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
            await _abort(context, method.__name__, exc)

    return wrapper  # type: ignore[return-value]


def streaming(method: F) -> F:
    """Map domain errors raised by a server-streaming handler to rich statuses."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for item in method(self, request, context):
                yield item
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
            await _abort(context, method.__name__, exc)

    return wrapper  # type: ignore[return-value]


# Stands for a request whose bytes did not parse (invalid UTF-8 in a string, corrupt bytes).
_UNDECODABLE = object()


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception:  # noqa: BLE001 - answered INVALID_ARGUMENT, see DecodeGuard
            return _UNDECODABLE

    return parse


async def _refuse(context: grpc.aio.ServicerContext, method: str) -> None:
    await _abort(
        context,
        method,
        InvalidArgument(
            "request",
            "is not a valid message of its type: a string field holds invalid UTF-8, "
            "or the bytes are corrupt; send it as the generated stubs encode it",
        ),
    )


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers a request that cannot be parsed INVALID_ARGUMENT with ErrorInfo, like any
    other bad input (grpcio itself would answer UNKNOWN or INTERNAL, with no details)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # (reflection's stream): grpcio's own answer stands
        method = details.method
        behavior = handler.unary_unary or handler.unary_stream

        # Unary calls, and streams that write with context.write (Health's Watch).
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is _UNDECODABLE:
                return await _refuse(context, method)
            return await behavior(request, context)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is _UNDECODABLE:
                await _refuse(context, method)
                return
            async for item in behavior(request, context):
                yield item

        parse = _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(call, parse, handler.response_serializer)
        wrapped = stream if inspect.isasyncgenfunction(behavior) else call
        return grpc.unary_stream_rpc_method_handler(wrapped, parse, handler.response_serializer)
