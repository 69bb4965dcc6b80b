"""Python values into the API's values and back: money, times, session ids, enum names
(the clients' arguments and the CLI's output)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeAlias

from google.protobuf import timestamp_pb2

from .v1 import session_pb2, webhook_pb2

Money: TypeAlias = Decimal | str | int | float
Time: TypeAlias = dt.datetime | timestamp_pb2.Timestamp
StateLike: TypeAlias = int | str
DisconnectLike: TypeAlias = int | str
ExhaustedLike: TypeAlias = int | str
SessionId: TypeAlias = str | uuid.UUID


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


def session_id(value: SessionId) -> str:
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

    def unknown(value: str) -> str:
        names = ", ".join(state_name(v) for v in session_pb2.SessionState.values() if v)
        return f"unknown session state {value!r} (one of {names})"

    return _enum_value(session_pb2.SessionState, "SESSION_STATE_", value, unknown)


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


def _short(enum: object, value: int, prefix: str) -> str:
    try:
        name = enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def on_disconnect(value: DisconnectLike | None) -> int:
    return _enum_value(
        session_pb2.OnDisconnect,
        "ON_DISCONNECT_",
        value,
        lambda v: f"on_disconnect must be 'cancel' or 'continue', not {v!r}",
    )


def on_budget_exhausted(value: ExhaustedLike | None) -> int:
    """ "end" or "pause" (or the enum's value); None: the tenant's default."""
    return _enum_value(
        session_pb2.OnBudgetExhausted,
        "ON_BUDGET_EXHAUSTED_",
        value,
        lambda v: f"on_budget_exhausted must be 'end' or 'pause', not {v!r}",
    )


def delivery_state(value: int | str | None) -> int:
    """ "pending", "delivered", "failed" (or the enum's value); None: any."""
    return _enum_value(
        webhook_pb2.DeliveryState,
        "DELIVERY_STATE_",
        value,
        lambda v: f"state must be 'pending', 'delivered' or 'failed', not {v!r}",
    )


def pause_reason_name(value: int) -> str:
    """ "SESSION_BUDGET" for PAUSE_REASON_SESSION_BUDGET."""
    return _short(session_pb2.PauseReason, value, "PAUSE_REASON_")


def delivery_state_name(value: int) -> str:
    """ "DELIVERED" for DELIVERY_STATE_DELIVERED."""
    return _short(webhook_pb2.DeliveryState, value, "DELIVERY_STATE_")


def _enum_value(
    enum: Any, prefix: str, value: int | str | None, unknown: Callable[[str], str]
) -> int:
    """An enum's value for an int or a name with or without its prefix (0 for None)."""
    if value is None:
        return 0
    if not isinstance(value, str):
        return int(value)
    name = value.strip().upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(enum.Value(name))
    except ValueError:
        raise ValueError(unknown(value)) from None


def strings(name: str, values: Sequence[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not a string")
    return [str(v) for v in values]
