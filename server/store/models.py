"""SQLAlchemy 2.x models: the tables agentplane persists."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .types import Money, UTCDateTime

# Stable constraint names, so Alembic migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON}


class SessionRow(Base):
    """One agent session; money in USD, times in UTC."""

    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_sessions_tenant_request_id"),
        Index("ix_sessions_tenant_created", "tenant", "created_at", "id"),
        Index("ix_sessions_tenant_state", "tenant", "state"),
        # Crash recovery: active sessions whose lease ran out.
        Index("ix_sessions_state_lease", "state", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A NULL request_id never collides, so the unique constraint only binds real keys.
    request_id: Mapped[str | None] = mapped_column(String(64))
    request_hash: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128), default="")
    allowed_tools: Mapped[list[str]] = mapped_column(JSON)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_budget_usd: Mapped[Decimal] = mapped_column(Money())
    max_turns: Mapped[int] = mapped_column(Integer)
    budget_day: Mapped[str] = mapped_column(String(10))
    # The agentplane session whose conversation this one continues.
    resumed_from: Mapped[str | None] = mapped_column(String(36))
    cost_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0))
    sdk_cost_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0))
    # How far the metered cost fell short of the CLI's own count, beyond the tolerance.
    shortfall_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0))
    num_turns: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_creation_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Server-side tool uses by the usage object's count name (NULL: none).
    server_tool_use: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error_reason: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str] = mapped_column(Text, default="")
    sdk_session_id: Mapped[str] = mapped_column(String(64), default="")
    result: Mapped[str] = mapped_column(Text, default="")
    # The server instance running the session and how long its claim lasts (crash recovery).
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When a CancelSession reached a replica that does not run the session: its owner
    # stops it (told by NOTIFY, or finding this at its next lease renewal).
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The caller tools' names and the approval patterns (NULL: none).
    caller_tools: Mapped[list[str] | None] = mapped_column(JSON)
    require_approval: Mapped[list[str] | None] = mapped_column(JSON)
    # The request's output schema (JSON text) and the structured result that matched it.
    output_schema: Mapped[str | None] = mapped_column(Text)
    structured_result: Mapped[Any] = mapped_column(JSON, nullable=True)
    # The trace it was admitted in and that call's span (hex), for links to it (NULL:
    # untraced).
    trace_id: Mapped[str | None] = mapped_column(String(32))
    trace_span_id: Mapped[str | None] = mapped_column(String(16))
    # The request's callback URL (one of its tenant's webhooks.callback_urls; NULL: none).
    callback_url: Mapped[str | None] = mapped_column(Text)
    # Paused at its budget (all NULL while not): why, since and until when, and a raise
    # the day's window could not cover yet (see domain.BudgetPause).
    pause_reason: Mapped[str | None] = mapped_column(String(16))
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    pause_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime())
    pending_budget_usd: Mapped[Decimal | None] = mapped_column(Money())


class SessionLabelRow(Base):
    """A session's labels, one row each, so ListSessions can filter by them in SQL."""

    __tablename__ = "session_labels"
    __table_args__ = (Index("ix_session_labels_key_value", "key", "value"),)

    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class EventRow(Base):
    """One SessionEvent; (session_id, seq) is gap-free from 1."""

    __tablename__ = "session_events"

    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class ModelRequestRow(Base):
    """One model request of a session as the metering gateway settled it: the audit trail
    a billing team reconciles against the upstream invoice."""

    __tablename__ = "model_requests"
    __table_args__ = (
        Index("ix_model_requests_session", "session_id"),
        Index("ix_model_requests_tenant_time", "tenant", "ended_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(63))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime())
    model: Mapped[str] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(32))
    status: Mapped[int | None] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_creation_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Server-side tool uses by the usage object's count name (NULL: none).
    server_tool_use: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    cost_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0))
    price_version: Mapped[str] = mapped_column(String(32), default="")
    upstream_request_id: Mapped[str] = mapped_column(String(128), default="")


class ToolUseRow(Base):
    """One tool call of a session, with its outcome."""

    __tablename__ = "tool_uses"
    __table_args__ = (Index("ix_tool_uses_session", "session_id"),)

    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    tool_use_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    is_error: Mapped[bool | None] = mapped_column()


class SessionInputRow(Base):
    """A running session's request to its caller and, once settled, its answer: Respond
    on any replica settles the row, the session's owner reads the answer."""

    __tablename__ = "session_inputs"
    __table_args__ = (Index("ix_session_inputs_session", "session_id", "resolved_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    tool_name: Mapped[str] = mapped_column(String(128))
    tool_use_id: Mapped[str] = mapped_column(String(128))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decided_by: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text)
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ArtifactRow(Base):
    """A file an ended session created or changed in its workspace: its content while
    within the tenant's limits, else NULL with the reason it was left out."""

    __tablename__ = "session_artifacts"

    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[bytes | None] = mapped_column(LargeBinary)
    omitted_reason: Mapped[str] = mapped_column(Text)


class WebhookDeliveryRow(Base):
    """One event for one receiver (the outbox): written in the transaction of the event,
    sent by whichever replica claims it, retried until delivered or its deadline. Its id
    is the `webhook-id` of every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # What is due: the claim's scan.
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_created", "tenant", "created_at", "id"),
        Index("ix_webhook_deliveries_session", "session_id"),
        # Events sent once per key (a day's budget threshold per endpoint).
        UniqueConstraint("dedupe_key", name="uq_webhook_deliveries_dedupe_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    # The tenant's endpoint it goes to, or "callback" (the session's callback URL).
    target: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    session_id: Mapped[str | None] = mapped_column(String(36))
    # The exact bytes signed and sent (JSON text).
    body: Mapped[str] = mapped_column(Text)
    dedupe_key: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))  # PENDING | DELIVERED | FAILED
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Retried until then (its tenant's webhooks.retry_s after the event).
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The replica sending it now and until when its claim holds (then any may take it).
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, default="")
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookAttemptRow(Base):
    """One attempt to send a delivery, and how it went."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int] = mapped_column(Integer)
    # The receiver's HTTP status (NULL: no response: refused, timed out, ...).
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text, default="")
    sender: Mapped[str] = mapped_column(String(64))


class BudgetWindowRow(Base):
    """A tenant's spend in one day window; the key is the day, so no reset job exists."""

    __tablename__ = "budget_windows"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    limit_usd: Mapped[Decimal] = mapped_column(Money())
    spent_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0))
    reserved_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0))


class ReservationRow(Base):
    """What a session holds in its window until it settles (exactly once)."""

    __tablename__ = "reservations"

    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    tenant: Mapped[str] = mapped_column(String(64))
    day: Mapped[str] = mapped_column(String(10))
    amount_usd: Mapped[Decimal] = mapped_column(Money())
    status: Mapped[str] = mapped_column(String(16))  # HELD | SETTLED
    actual_usd: Mapped[Decimal | None] = mapped_column(Money())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TranscriptEntryRow(Base):
    """One line of an SDK session transcript (the SessionStore mirror), in append order."""

    __tablename__ = "transcript_entries"
    __table_args__ = (
        Index("ix_transcript_entries_key", "project_key", "session_id", "subpath", "id"),
        Index("ix_transcript_entries_uuid", "project_key", "session_id", "subpath", "uuid"),
    )

    # INTEGER on SQLite, where only that type auto-increments a primary key.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    project_key: Mapped[str] = mapped_column(String(255))
    session_id: Mapped[str] = mapped_column(String(64))
    subpath: Mapped[str] = mapped_column(String(255))  # "" for the main transcript
    uuid: Mapped[str | None] = mapped_column(String(64))
    entry: Mapped[dict[str, Any]] = mapped_column(JSON)


class TranscriptRow(Base):
    """A transcript's key and when it was last written (epoch ms, for list_sessions)."""

    __tablename__ = "transcripts"

    project_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subpath: Mapped[str] = mapped_column(String(255), primary_key=True)
    mtime_ms: Mapped[int] = mapped_column(BigInteger)


def table(model: type[Base]) -> Table:
    """A model's Core table: statements on it skip the ORM's unit of work (and its CPU)."""
    return cast(Table, model.__table__)
