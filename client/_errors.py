"""The client's exceptions.

Every exception the client raises on purpose derives from :class:`AgentplaneError`::

    Exception
     └── AgentplaneError            anything the agentplane client raises on purpose
          ├── RPCError              a call failed with a gRPC status
          │                         (.code, .message, .reason, .domain, .metadata,
          │                          .field_violations, .quota_violations, .status)
          ├── SessionFailed         run_for_result: the session ended ERROR
          │                         (.session, .reason, .message)
          └── ArtifactError         get_artifact: the chunks did not add up to the
                                    artifact the server described (.session_id, .path)

A gRPC failure of any call (``grpc.RpcError`` from the sync API, ``grpc.aio.AioRpcError``
from the asyncio one) is re-raised as :class:`RPCError` with the original as its
``__cause__``. The server's rich error details (``google.rpc.Status`` in the trailing
metadata ``grpc-status-details-bin``) are decoded into plain attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from .v1 import session_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exceeded quota (google.rpc.QuotaFailure.Violation)."""

    subject: str
    description: str


class AgentplaneError(Exception):
    """The root of the agentplane client's exceptions."""


class SessionFailed(AgentplaneError):
    """A session ended ERROR where its result was wanted (:meth:`Client.run_for_result`).

    Attributes:
        session: the final Session (state ERROR).
        reason: the ErrorReason's short name, e.g. ``"INVALID_OUTPUT"`` or ``"MAX_TURNS"``.
        message: the server's explanation.
    """

    def __init__(self, session: session_pb2.Session) -> None:
        self.session = session
        self.reason = _reason_name(session.error.reason)
        self.message = session.error.message
        text = f"session {session.id} failed: {self.reason}"
        super().__init__(f"{text}: {self.message}" if self.message else text)


class ArtifactError(AgentplaneError):
    """An artifact's chunks did not add up: a missing first chunk, an offset out of order,
    or a size or SHA-256 other than the artifact's own."""

    def __init__(self, session_id: str, path: str, problem: str) -> None:
        self.session_id = session_id
        self.path = path
        super().__init__(f"artifact {path!r} of session {session_id}: {problem}")


def _reason_name(value: int) -> str:
    try:
        return session_pb2.ErrorReason.Name(value).removeprefix("ERROR_REASON_")
    except ValueError:
        return str(value)


class RPCError(AgentplaneError):
    """A call failed with a gRPC status.

    Attributes:
        code: the ``grpc.StatusCode``.
        message: the status message (``details()`` in grpc's terms).
        reason: the ErrorInfo reason, e.g. ``"BUDGET_EXCEEDED"`` or ``"INVALID_ARGUMENT"``
            (empty when the server sent no rich details, e.g. a connection failure).
        domain: the ErrorInfo domain (``"agentplane.dev"``), or empty.
        metadata: the ErrorInfo metadata.
        field_violations: the BadRequest field violations (which request field was wrong).
        quota_violations: the QuotaFailure violations.
        status: the decoded ``google.rpc.Status``, or None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        quota_violations: Iterable[QuotaViolation] = (),
        status: status_pb2.Status | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)
        self.status = status
        super().__init__(str(self))

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, grpc.StatusCode) else str(self.code)
        if self.reason and self.reason != name:
            name = f"{name} ({self.reason})"
        return f"{name}: {self.message}" if self.message else name

    @classmethod
    def from_grpc(cls, exc: grpc.RpcError) -> RPCError:
        """The RPCError for a ``grpc.RpcError`` / ``grpc.aio.AioRpcError``."""
        code = _call(exc, "code") or grpc.StatusCode.UNKNOWN
        message = _call(exc, "details") or ""
        status = _rich_status(_call(exc, "trailing_metadata") or ())
        reason = domain = ""
        metadata: dict[str, str] = {}
        fields: list[FieldViolation] = []
        quotas: list[QuotaViolation] = []
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                quotas.extend(QuotaViolation(v.subject, v.description) for v in quota.violations)
        return cls(
            code,
            message,
            reason=reason,
            domain=domain,
            metadata=metadata,
            field_violations=fields,
            quota_violations=quotas,
            status=status,
        )


def _call(exc: object, name: str) -> Any:
    method = getattr(exc, name, None)
    return method() if callable(method) else None


def _rich_status(trailing: Iterable[tuple[str, Any]]) -> status_pb2.Status | None:
    for key, value in trailing:
        if key == STATUS_DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


@contextmanager
def rpc_errors(call: Any = None) -> Iterator[None]:
    """Re-raise a gRPC failure inside as :class:`RPCError`; cancel ``call`` (a streaming
    call) on the way out, whichever way that is."""
    try:
        yield
    except grpc.RpcError as exc:
        raise RPCError.from_grpc(exc) from exc
    finally:
        if call is not None:
            call.cancel()
