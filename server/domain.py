"""The domain vocabulary shared by every layer: states, reasons, sessions, events.

Plain data with no I/O; `store`, `sessions` and `api` all speak it, so it imports nothing
of theirs.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

MICRO = Decimal("0.000001")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def usd(value: Decimal | float | str) -> Decimal:
    """Money as a Decimal exact to the micro-dollar (floats go through their repr)."""
    if isinstance(value, float):
        value = repr(value)
    return Decimal(value).quantize(MICRO)


class SessionState(enum.StrEnum):
    """IDLE -> RUNNING -> COMPLETE | ERROR, or IDLE -> ERROR; terminal states never change."""

    IDLE = "IDLE"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    ERROR = "ERROR"

    @property
    def terminal(self) -> bool:
        return self in (SessionState.COMPLETE, SessionState.ERROR)


class ErrorReason(enum.StrEnum):
    """Why a session ended in ERROR (names match the proto's ErrorReason)."""

    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    MAX_TURNS = "MAX_TURNS"
    CANCELLED = "CANCELLED"
    SHUTDOWN = "SHUTDOWN"
    AGENT_FAILED = "AGENT_FAILED"
    INTERRUPTED = "INTERRUPTED"
    MODEL_API_ERROR = "MODEL_API_ERROR"
    TIMEOUT = "TIMEOUT"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    MEMORY_LIMIT = "MEMORY_LIMIT"
    PROCESS_LIMIT = "PROCESS_LIMIT"
    CPU_LIMIT = "CPU_LIMIT"
    DISK_LIMIT = "DISK_LIMIT"
    INVALID_OUTPUT = "INVALID_OUTPUT"
    EVENT_LIMIT = "EVENT_LIMIT"


class EventKind(enum.StrEnum):
    """The kinds of SessionEvent (names match the proto's oneof fields)."""

    STARTED = "started"
    ASSISTANT_TEXT = "assistant_text"
    TOOL_USE = "tool_use"
    TOOL_RESULT = "tool_result"
    RETRYING = "retrying"
    STATE_CHANGE = "state_change"
    SYSTEM = "system"
    THINKING = "thinking"
    RESULT = "result"
    INPUT_REQUEST = "input_request"
    INPUT_RESOLVED = "input_resolved"
    # Paused at its budget, and its budget raised (see BudgetPause).
    PAUSED = "paused"
    BUDGET_RAISED = "budget_raised"
    # Live only (LiveSession.publish_transient): seq 0, never persisted or replayed.
    TEXT_DELTA = "text_delta"


class OnBudgetExhausted(enum.StrEnum):
    """What a session does when its next model request would pass its budget (names
    match the proto's OnBudgetExhausted)."""

    END = "END"
    PAUSE = "PAUSE"


class PauseReason(enum.StrEnum):
    """Why a session is paused (names match the proto's PauseReason)."""

    SESSION_BUDGET = "SESSION_BUDGET"
    DAILY_LIMIT = "DAILY_LIMIT"


@dataclass(frozen=True)
class BudgetPause:
    """A running session paused at its budget: a model request of it is held until its
    budget is raised, it is cancelled, or `deadline` passes. `pending_usd`: a raise asked
    for that the tenant's day window could not cover (reason DAILY_LIMIT)."""

    reason: PauseReason
    since: datetime
    deadline: datetime
    pending_usd: Decimal | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "since": self.since.isoformat(),
            "deadline": self.deadline.isoformat(),
            "pending_budget_usd": str(self.pending_usd) if self.pending_usd is not None else "",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BudgetPause:
        pending = data.get("pending_budget_usd") or ""
        return cls(
            PauseReason(data["reason"]),
            datetime.fromisoformat(data["since"]),
            datetime.fromisoformat(data["deadline"]),
            Decimal(pending) if pending else None,
        )


class InputKind(enum.StrEnum):
    """What a session asks its caller for (names match the proto's InputKind)."""

    TOOL_CALL = "TOOL_CALL"
    PERMISSION = "PERMISSION"
    QUESTION = "QUESTION"


class Decider(enum.StrEnum):
    """Who settled an input request (names match the proto's Decider)."""

    CALLER = "CALLER"
    TIMEOUT = "TIMEOUT"
    SESSION_END = "SESSION_END"


@dataclass(frozen=True)
class InputRequest:
    """A running session's request to its caller, until it is settled."""

    id: str
    session_id: str
    kind: InputKind
    tool_name: str
    tool_use_id: str
    input: dict[str, Any]
    created_at: datetime
    deadline: datetime

    def to_json(self) -> dict[str, Any]:
        """The `input_request` event's data (and Session.awaiting's entries)."""
        return {
            "request_id": self.id,
            "kind": self.kind.value,
            "tool_name": self.tool_name,
            "tool_use_id": self.tool_use_id,
            "input": self.input,
            "created_at": self.created_at.isoformat(),
            "deadline": self.deadline.isoformat(),
        }

    @classmethod
    def from_json(cls, session_id: str, data: dict[str, Any]) -> InputRequest:
        return cls(
            id=data["request_id"],
            session_id=session_id,
            kind=InputKind(data["kind"]),
            tool_name=data["tool_name"],
            tool_use_id=data["tool_use_id"],
            input=dict(data["input"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            deadline=datetime.fromisoformat(data["deadline"]),
        )


@dataclass(frozen=True)
class InputAnswer:
    """How an input request was settled: by whom, and with what (`value` as its kind
    takes it: a tool result, a permission decision, or the answers to questions)."""

    decided_by: Decider
    outcome: str
    message: str = ""
    value: dict[str, Any] = field(default_factory=dict)

    def to_json(self, request: InputRequest) -> dict[str, Any]:
        """The `input_resolved` event's data (never the answer itself: it may be large)."""
        return {
            "request_id": request.id,
            "kind": request.kind.value,
            "decided_by": self.decided_by.value,
            "outcome": self.outcome,
            "message": self.message,
        }


def _count(value: object) -> int:
    """A token count read from JSON: a positive int, else 0 (bools, floats, strings,
    negatives and absent keys all count as nothing)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


# The token counts a session records (its table's columns, the proto's TokenUsage).
RECORDED_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Every token count of a TokenUsage (the four above and the 1-hour part of cache writes).
TOKEN_COUNTS = (*RECORDED_COUNTS, "cache_creation_1h_input_tokens")


def server_tool_counts(value: object) -> dict[str, int]:
    """The counts of a ``server_tool_use`` object (unit name -> uses): every key with a
    positive integer count (``web_search_requests``, ``web_fetch_requests``, any other
    the API adds); anything else counts as nothing."""
    if not value or not isinstance(value, Mapping):
        return {}
    return {str(unit): count for unit, v in value.items() if (count := _count(v))}


@dataclass(frozen=True)
class TokenUsage:
    """Token counts of one model response, or summed over a session's requests.

    ``cache_creation_1h_input_tokens`` is the part of ``cache_creation_input_tokens``
    written with a 1-hour TTL (priced higher than a 5-minute write). It only prices
    requests: the sessions table, the proto and :meth:`to_json` keep the four API counts.
    ``server_tool_use`` counts the server-side tool uses upstream ran (and bills per use),
    by the usage object's name for them (``web_search_requests``, ...); positive counts
    only, so an empty mapping is "none".
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    server_tool_use: Mapping[str, int] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        """Every input token of the request: uncached, written to and read from the cache
        (what a long-context threshold is measured against)."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def plus(self, other: TokenUsage) -> TokenUsage:
        """The field-wise sum (a session's requests, or a resumed session's runs)."""
        uses = dict(self.server_tool_use)
        for unit, count in other.server_tool_use.items():
            uses[unit] = uses.get(unit, 0) + count
        return _token_usage([getattr(self, n) + getattr(other, n) for n in TOKEN_COUNTS], uses)

    def max_with(self, other: TokenUsage) -> TokenUsage:
        """The field-wise maximum (how a stream's cumulative usage events combine)."""
        uses = dict(self.server_tool_use)
        for unit, count in other.server_tool_use.items():
            uses[unit] = max(uses.get(unit, 0), count)
        return _token_usage([max(getattr(self, n), getattr(other, n)) for n in TOKEN_COUNTS], uses)

    @classmethod
    def from_api(cls, usage: Mapping[str, Any]) -> TokenUsage:
        """Parse the Messages API's ``usage`` object (the one parser of it).

        The 1-hour share of the cache writes is ``cache_creation.ephemeral_1h_input_tokens``;
        ``server_tool_use`` holds the server-side tool uses. When the object breaks the
        request down into ``iterations`` (server-side loops, compaction, an advisor), each
        count is the larger of its top-level value and its sum over the iterations: the
        top level leaves some iterations out (a compaction's), and what upstream bills
        is the sum. Other keys (``service_tier``, ...) are ignored.
        """
        top = cls._counts(usage, server_tool_counts(usage.get("server_tool_use")))
        iterations = usage.get("iterations")
        if isinstance(iterations, list):
            summed = cls()
            for iteration in iterations:
                if isinstance(iteration, Mapping):
                    summed = summed.plus(cls._counts(iteration, {}))
            top = top.max_with(summed)
        return top

    @classmethod
    def _counts(cls, usage: Mapping[str, Any], server_tool_use: Mapping[str, int]) -> TokenUsage:
        detail = usage.get("cache_creation")
        return cls(
            _count(usage.get("input_tokens")),
            _count(usage.get("output_tokens")),
            _count(usage.get("cache_creation_input_tokens")),
            _count(usage.get("cache_read_input_tokens")),
            _count(
                detail.get("ephemeral_1h_input_tokens") if isinstance(detail, Mapping) else None
            ),
            server_tool_use,
        )

    def to_json(self) -> dict[str, int]:
        """The counts a session records (Session.to_json's ``usage``): the four of the
        database and the proto. The 1-hour part of cache writes only prices requests; left
        out, event payloads stay readable by servers of the previous release (which take
        exactly these four keys). Server tool uses travel beside it (Session.to_json)."""
        return {name: getattr(self, name) for name in RECORDED_COUNTS}

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], server_tool_use: Mapping[str, Any] | None = None
    ) -> TokenUsage:
        """Read :meth:`to_json` (a key it lacks is 0), with the server tool uses kept
        beside it."""
        return _token_usage(
            [int(data.get(name, 0)) for name in TOKEN_COUNTS], server_tool_counts(server_tool_use)
        )


def _token_usage(counts: list[int], server_tool_use: Mapping[str, int]) -> TokenUsage:
    """A TokenUsage of the TOKEN_COUNTS in their order."""
    inputs, outputs, writes, reads, writes_1h = counts
    return TokenUsage(inputs, outputs, writes, reads, writes_1h, server_tool_use)


@dataclass(frozen=True)
class Session:
    """One agent session as agentplane records it."""

    id: str
    tenant: str
    state: SessionState
    create_time: datetime
    max_budget_usd: Decimal
    max_turns: int
    allowed_tools: tuple[str, ...]
    model: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    cost_usd: Decimal = Decimal(0)
    sdk_cost_usd: Decimal = Decimal(0)
    # How far the metered cost fell short of the CLI's own count (sdk_cost_usd), when by
    # more than the tolerance (see money/shortfall.py); else 0.
    shortfall_usd: Decimal = Decimal(0)
    num_turns: int = 0
    usage: TokenUsage = TokenUsage()
    error_reason: ErrorReason | None = None
    error_message: str = ""
    sdk_session_id: str = ""
    result: str = ""
    resumed_from: str = ""
    # The caller tools it was started with, and what needs the caller's approval.
    caller_tools: tuple[str, ...] = ()
    require_approval: tuple[str, ...] = ()
    # Its requests to the caller not yet settled (RUNNING only).
    awaiting: tuple[InputRequest, ...] = ()
    # The schema its result must match (JSON text; "" for none), and the matching result.
    output_schema: str = ""
    structured_result: Any = None
    # The trace it was admitted in and that RunSession's span (hex; "" when untraced):
    # what later calls about the session link to.
    trace_id: str = ""
    trace_span_id: str = ""
    # Where its events are also sent (one of its tenant's webhooks.callback_urls; "": none).
    callback_url: str = ""
    # Set while it is paused at its budget (RUNNING only).
    paused: BudgetPause | None = None

    def evolve(self, **changes: Any) -> Session:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (stored in event payloads)."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "state": self.state.value,
            "create_time": self.create_time.isoformat(),
            "max_budget_usd": str(self.max_budget_usd),
            "max_turns": self.max_turns,
            "allowed_tools": list(self.allowed_tools),
            "model": self.model,
            "labels": dict(self.labels),
            "request_id": self.request_id,
            "start_time": self.start_time.isoformat() if self.start_time else None,
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "cost_usd": str(self.cost_usd),
            "sdk_cost_usd": str(self.sdk_cost_usd),
            "shortfall_usd": str(self.shortfall_usd),
            "num_turns": self.num_turns,
            "usage": self.usage.to_json(),
            "server_tool_use": dict(self.usage.server_tool_use),
            "error_reason": self.error_reason.value if self.error_reason else None,
            "error_message": self.error_message,
            "sdk_session_id": self.sdk_session_id,
            "result": self.result,
            "resumed_from": self.resumed_from,
            "caller_tools": list(self.caller_tools),
            "require_approval": list(self.require_approval),
            "awaiting": [request.to_json() for request in self.awaiting],
            "output_schema": self.output_schema,
            "structured_result": self.structured_result,
            "trace_id": self.trace_id,
            "trace_span_id": self.trace_span_id,
            "callback_url": self.callback_url,
            "paused": self.paused.to_json() if self.paused is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Session:
        def when(value: str | None) -> datetime | None:
            return datetime.fromisoformat(value) if value else None

        return cls(
            id=data["id"],
            tenant=data["tenant"],
            state=SessionState(data["state"]),
            create_time=datetime.fromisoformat(data["create_time"]),
            max_budget_usd=Decimal(data["max_budget_usd"]),
            max_turns=data["max_turns"],
            allowed_tools=tuple(data["allowed_tools"]),
            model=data["model"],
            labels=dict(data["labels"]),
            request_id=data["request_id"],
            start_time=when(data["start_time"]),
            end_time=when(data["end_time"]),
            cost_usd=Decimal(data["cost_usd"]),
            sdk_cost_usd=Decimal(data["sdk_cost_usd"]),
            shortfall_usd=Decimal(data.get("shortfall_usd", "0")),
            num_turns=data["num_turns"],
            usage=TokenUsage.from_json(data["usage"], data.get("server_tool_use")),
            error_reason=ErrorReason(data["error_reason"]) if data["error_reason"] else None,
            error_message=data["error_message"],
            sdk_session_id=data["sdk_session_id"],
            result=data["result"],
            resumed_from=data.get("resumed_from", ""),
            caller_tools=tuple(data.get("caller_tools", ())),
            require_approval=tuple(data.get("require_approval", ())),
            awaiting=tuple(InputRequest.from_json(data["id"], a) for a in data.get("awaiting", ())),
            output_schema=data.get("output_schema", ""),
            structured_result=data.get("structured_result"),
            trace_id=data.get("trace_id", ""),
            trace_span_id=data.get("trace_span_id", ""),
            callback_url=data.get("callback_url", ""),
            paused=BudgetPause.from_json(data["paused"]) if data.get("paused") else None,
        )


@dataclass(frozen=True)
class Event:
    """One SessionEvent: `data` holds the kind's fields (a Session as JSON for
    started/result)."""

    session_id: str
    seq: int
    time: datetime
    kind: EventKind
    data: dict[str, Any]


@dataclass(frozen=True)
class Artifact:
    """A file a session created or changed in its workspace; `content` is None when it
    was left out (`omitted_reason` says why)."""

    path: str
    size: int
    sha256: str = ""
    content: bytes | None = None
    omitted_reason: str = ""


@dataclass(frozen=True)
class BudgetWindow:
    """A tenant's spend in one day window."""

    tenant: str
    day: str
    time_zone: str
    window_start: datetime
    window_end: datetime
    limit_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal

    @property
    def remaining_usd(self) -> Decimal:
        return max(Decimal(0), self.limit_usd - self.spent_usd - self.reserved_usd)


@dataclass(frozen=True)
class ModelUsage:
    """One model's metered requests (``model_requests``) of a tenant over a time range."""

    model: str
    requests_by_outcome: dict[str, int] = field(default_factory=dict)
    usage: TokenUsage = field(default_factory=TokenUsage)
    cost_usd: Decimal = Decimal(0)

    @property
    def requests_total(self) -> int:
        return sum(self.requests_by_outcome.values())


@dataclass(frozen=True)
class Usage:
    """What a tenant's sessions created in [start, end) did, and its model requests that
    ended in [start, end) by model (sorted by model), from the database."""

    tenant: str
    start: datetime | None
    end: datetime
    sessions_total: int = 0
    sessions_succeeded: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    total_cost_usd: Decimal = Decimal(0)
    ended_cost_usd: Decimal = Decimal(0)
    total_turns: int = 0
    tool_uses: dict[str, int] = field(default_factory=dict)
    models: tuple[ModelUsage, ...] = ()
    # Sessions whose metered cost fell short of the CLI's own count, and by how much.
    sessions_short: int = 0
    shortfall_usd: Decimal = Decimal(0)

    @property
    def sessions_failed(self) -> int:
        return sum(self.failures_by_reason.values())

    @property
    def success_rate(self) -> float:
        """succeeded / (succeeded + failed); 0 when none ended."""
        ended = self.sessions_succeeded + self.sessions_failed
        return self.sessions_succeeded / ended if ended else 0.0

    @property
    def average_cost_usd(self) -> Decimal:
        """The average cost of an ended session (0 when none ended)."""
        ended = self.sessions_succeeded + self.sessions_failed
        return usd(self.ended_cost_usd / ended) if ended else Decimal(0).quantize(MICRO)
