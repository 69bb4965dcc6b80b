"""What the sync and asyncio clients share: settings from the environment, call metadata,
and building request messages from Python values."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TypeAlias

from google.protobuf import timestamp_pb2

from . import _files as files
from . import _inputs as inputs
from .v1 import budget_pb2, session_pb2, usage_pb2, webhook_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "AGENTPLANE_TARGET"
TOKEN_ENV = "AGENTPLANE_TOKEN"

Money: TypeAlias = Decimal | str | int | float
Time: TypeAlias = dt.datetime | timestamp_pb2.Timestamp
StateLike: TypeAlias = int | str
DisconnectLike: TypeAlias = int | str
ExhaustedLike: TypeAlias = int | str


def resolve_target(target: str | None) -> str:
    """The target argument, else ``$AGENTPLANE_TARGET``, else 127.0.0.1:50051."""
    return target or os.environ.get(TARGET_ENV, "").strip() or DEFAULT_TARGET


def resolve_token(token: str | None) -> str | None:
    """The token argument, else ``$AGENTPLANE_TOKEN``, else None (dev-mode servers)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def money(value: Money | None) -> str:
    """A USD amount as the decimal string the API wants ("" for None)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        raise TypeError("a money amount cannot be a bool")
    if isinstance(value, float):
        return str(Decimal(repr(value)))
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    raise TypeError(f"a money amount must be a Decimal, str, int or float, not {type(value)!r}")


def session_id(value: str | uuid.UUID) -> str:
    return str(value)


def timestamp(value: Time | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for a datetime (naive ones are taken as UTC) or a Timestamp."""
    if value is None or isinstance(value, timestamp_pb2.Timestamp):
        return value
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime or Timestamp, not {type(value)!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def session_state(value: StateLike | None) -> int:
    """A SessionState for an enum value or a name ("complete", "SESSION_STATE_COMPLETE")."""
    if value is None:
        return session_pb2.SESSION_STATE_UNSPECIFIED
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("SESSION_STATE_"):
            name = "SESSION_STATE_" + name
        try:
            return session_pb2.SessionState.Value(name)
        except ValueError:
            names = ", ".join(state_name(v) for v in session_pb2.SessionState.values() if v)
            raise ValueError(f"unknown session state {value!r} (one of {names})") from None
    return int(value)


def state_name(value: int) -> str:
    """ "COMPLETE" for SESSION_STATE_COMPLETE."""
    return _short(session_pb2.SessionState, value, "SESSION_STATE_")


def reason_name(value: int) -> str:
    """ "MAX_TURNS" for ERROR_REASON_MAX_TURNS."""
    return _short(session_pb2.ErrorReason, value, "ERROR_REASON_")


def input_kind_name(value: int) -> str:
    """ "PERMISSION" for INPUT_KIND_PERMISSION."""
    return _short(session_pb2.InputKind, value, "INPUT_KIND_")


def decider_name(value: int) -> str:
    """ "CALLER" for DECIDER_CALLER."""
    return _short(session_pb2.Decider, value, "DECIDER_")


def pause_reason_name(value: int) -> str:
    """ "SESSION_BUDGET" for PAUSE_REASON_SESSION_BUDGET."""
    return _short(session_pb2.PauseReason, value, "PAUSE_REASON_")


def delivery_state_name(value: int) -> str:
    """ "DELIVERED" for DELIVERY_STATE_DELIVERED."""
    return _short(webhook_pb2.DeliveryState, value, "DELIVERY_STATE_")


def _short(enum: object, value: int, prefix: str) -> str:
    try:
        name = enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def on_disconnect(value: DisconnectLike | None) -> int:
    if value is None:
        return session_pb2.ON_DISCONNECT_UNSPECIFIED
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("ON_DISCONNECT_"):
            name = "ON_DISCONNECT_" + name
        try:
            return session_pb2.OnDisconnect.Value(name)
        except ValueError:
            raise ValueError(
                f"on_disconnect must be 'cancel' or 'continue', not {value!r}"
            ) from None
    return int(value)


def on_budget_exhausted(value: ExhaustedLike | None) -> int:
    """ "end" or "pause" (or the enum's value); None: the tenant's default."""
    if value is None:
        return session_pb2.ON_BUDGET_EXHAUSTED_UNSPECIFIED
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("ON_BUDGET_EXHAUSTED_"):
            name = "ON_BUDGET_EXHAUSTED_" + name
        try:
            return session_pb2.OnBudgetExhausted.Value(name)
        except ValueError:
            raise ValueError(
                f"on_budget_exhausted must be 'end' or 'pause', not {value!r}"
            ) from None
    return int(value)


def budget_update_request(
    session_id_: str | uuid.UUID, max_budget_usd: Money
) -> session_pb2.UpdateSessionBudgetRequest:
    return session_pb2.UpdateSessionBudgetRequest(
        session_id=session_id(session_id_), max_budget_usd=money(max_budget_usd)
    )


def deliveries_request(
    *,
    page_size: int = 0,
    page_token: str = "",
    session_id_: str | uuid.UUID | None = None,
    state: int | str | None = None,
    event: str = "",
) -> webhook_pb2.ListWebhookDeliveriesRequest:
    """ListWebhookDeliveries' request; `state` "pending", "delivered", "failed" or the
    enum's value."""
    if isinstance(state, str):
        name = state.strip().upper()
        try:
            state = webhook_pb2.DeliveryState.Value(
                name if name.startswith("DELIVERY_STATE_") else "DELIVERY_STATE_" + name
            )
        except ValueError:
            raise ValueError(
                f"state must be 'pending', 'delivered' or 'failed', not {state!r}"
            ) from None
    return webhook_pb2.ListWebhookDeliveriesRequest(
        page_size=page_size,
        page_token=page_token,
        session_id=str(session_id_) if session_id_ is not None else "",
        state=state or 0,  # type: ignore[arg-type]
        event=event,
    )


def _strings(name: str, values: Sequence[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not a string")
    return [str(v) for v in values]


def run_request(
    prompt: str,
    *,
    max_budget_usd: Money | None = None,
    max_turns: int | None = None,
    allowed_tools: Sequence[str] | None = None,
    model: str | None = None,
    labels: Mapping[str, str] | None = None,
    request_id: str | uuid.UUID | None = None,
    on_disconnect_: DisconnectLike | None = None,
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
    on_budget_exhausted_: ExhaustedLike | None = None,
) -> session_pb2.RunSessionRequest:
    request = session_pb2.RunSessionRequest(
        prompt=prompt,
        request_id=str(request_id) if request_id is not None else "",
        max_budget_usd=money(max_budget_usd),
        max_turns=max_turns or 0,
        allowed_tools=_strings("allowed_tools", allowed_tools),
        model=model or "",
        labels=dict(labels or {}),
        on_disconnect=on_disconnect(on_disconnect_),  # type: ignore[arg-type]
        resume_session_id=str(resume_session_id) if resume_session_id is not None else "",
        tools=inputs.caller_tools(tools),
        require_approval=_strings("require_approval", require_approval),
        output_schema_json=files.output_schema_json(output_schema),
        input_files=files.input_files(input_files),
        include_partial_messages=include_partial_messages,
        effort=effort or "",
        max_thinking_tokens=max_thinking_tokens or 0,
        fallback_model=fallback_model or "",
        callback_url=callback_url or "",
        on_budget_exhausted=on_budget_exhausted(on_budget_exhausted_),  # type: ignore[arg-type]
    )
    timeout = inputs.duration(answer_timeout)
    if timeout is not None:
        request.answer_timeout.CopyFrom(timeout)
    return request


def list_request(
    *,
    page_size: int = 0,
    page_token: str = "",
    state: StateLike | None = None,
    labels: Mapping[str, str] | None = None,
    create_time_start: Time | None = None,
    create_time_end: Time | None = None,
    awaiting: bool = False,
    paused: bool = False,
) -> session_pb2.ListSessionsRequest:
    request = session_pb2.ListSessionsRequest(
        awaiting=awaiting,
        paused=paused,
        page_size=page_size,
        page_token=page_token,
        state=session_state(state),  # type: ignore[arg-type]
        labels=dict(labels or {}),
    )
    start, end = timestamp(create_time_start), timestamp(create_time_end)
    if start is not None:
        request.create_time_start.CopyFrom(start)
    if end is not None:
        request.create_time_end.CopyFrom(end)
    return request


def budget_request(date: str | dt.date | None) -> budget_pb2.GetBudgetRequest:
    if isinstance(date, dt.datetime):
        date = date.date()
    if isinstance(date, dt.date):
        date = date.isoformat()
    return budget_pb2.GetBudgetRequest(date=date or "")


def usage_request(start_time: Time | None, end_time: Time | None) -> usage_pb2.GetUsageRequest:
    request = usage_pb2.GetUsageRequest()
    start, end = timestamp(start_time), timestamp(end_time)
    if start is not None:
        request.start_time.CopyFrom(start)
    if end is not None:
        request.end_time.CopyFrom(end)
    return request
