"""Proto <-> domain conversion."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agentplane.v1 import budget_pb2, session_pb2, usage_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ..domain import (
    Artifact,
    BudgetWindow,
    Decider,
    Event,
    EventKind,
    InputAnswer,
    InputKind,
    InputRequest,
    OnBudgetExhausted,
    Session,
    SessionState,
    TokenUsage,
    Usage,
    usd,
)
from ..errors import InvalidArgument
from ..sessions.run_request import CallerTool, InputFile, RunRequest


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799


def from_timestamp(msg: object, field: str) -> datetime | None:
    """The Timestamp `field` of `msg` (None when unset); InvalidArgument outside the range
    google.protobuf.Timestamp defines."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value: Timestamp = getattr(msg, field)
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS:
        raise InvalidArgument(
            field, "must lie between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z"
        )
    if not 0 <= value.nanos <= 999_999_999:
        raise InvalidArgument(field, "nanos must be between 0 and 999,999,999")
    return value.ToDatetime(tzinfo=UTC)


def state_to_proto(state: SessionState) -> int:
    return session_pb2.SessionState.Value(f"SESSION_STATE_{state.value}")


def state_from_proto(value: int) -> SessionState | None:
    if value == session_pb2.SESSION_STATE_UNSPECIFIED:
        return None
    if value not in session_pb2.SessionState.values():
        raise InvalidArgument("state", f"{value} is not a SessionState")
    return SessionState(session_pb2.SessionState.Name(value).removeprefix("SESSION_STATE_"))


def session_to_proto(s: Session) -> session_pb2.Session:
    msg = session_pb2.Session(
        id=s.id,
        tenant=s.tenant,
        state=state_to_proto(s.state),  # type: ignore[arg-type]
        create_time=timestamp(s.create_time),
        start_time=timestamp(s.start_time),
        end_time=timestamp(s.end_time),
        cost_usd=money(s.cost_usd),
        sdk_cost_usd=money(s.sdk_cost_usd),
        max_budget_usd=money(s.max_budget_usd),
        num_turns=s.num_turns,
        max_turns=s.max_turns,
        usage=token_usage(s.usage),
        model=s.model,
        sdk_session_id=s.sdk_session_id,
        labels=s.labels,
        result=s.result,
        allowed_tools=list(s.allowed_tools),
        request_id=s.request_id,
        resume_session_id=s.resumed_from,
        awaiting=[input_request_to_proto(r) for r in s.awaiting],
        caller_tools=list(s.caller_tools),
        require_approval=list(s.require_approval),
        output_schema_json=s.output_schema,
        structured_result_json=(
            json.dumps(s.structured_result, ensure_ascii=False)
            if s.structured_result is not None
            else ""
        ),
        trace_id=s.trace_id,
        callback_url=s.callback_url,
        paused=pause_to_proto(s.paused.to_json()) if s.paused is not None else None,
    )
    if s.error_reason is not None:
        msg.error.reason = session_pb2.ErrorReason.Value(f"ERROR_REASON_{s.error_reason.value}")
        msg.error.message = s.error_message
    return msg


def event_to_proto(e: Event) -> session_pb2.SessionEvent:
    msg = session_pb2.SessionEvent(session_id=e.session_id, seq=e.seq, time=timestamp(e.time))
    data = e.data
    if e.kind is EventKind.STARTED:
        msg.started.session.CopyFrom(session_to_proto(Session.from_json(data["session"])))
    elif e.kind is EventKind.RESULT:
        msg.result.session.CopyFrom(session_to_proto(Session.from_json(data["session"])))
    elif e.kind is EventKind.INPUT_REQUEST:
        msg.input_request.CopyFrom(
            input_request_to_proto(InputRequest.from_json(e.session_id, data))
        )
    elif e.kind is EventKind.INPUT_RESOLVED:
        msg.input_resolved.CopyFrom(input_resolved_to_proto(data))
    elif e.kind is EventKind.PAUSED:
        msg.paused.pause.CopyFrom(pause_to_proto(data["pause"]))
        msg.paused.max_budget_usd = data["max_budget_usd"]
        msg.paused.cost_usd = data["cost_usd"]
    elif e.kind is EventKind.STATE_CHANGE:
        msg.state_change.from_state = state_to_proto(SessionState(data["from_state"]))  # type: ignore[assignment]
        msg.state_change.to_state = state_to_proto(SessionState(data["to_state"]))  # type: ignore[assignment]
    else:
        # The other kinds store exactly their proto message's fields.
        getattr(msg, e.kind.value).MergeFrom(getattr(session_pb2, _MESSAGE_OF[e.kind])(**data))
    return msg


_MESSAGE_OF = {
    EventKind.ASSISTANT_TEXT: "AssistantText",
    EventKind.TOOL_USE: "ToolUse",
    EventKind.TOOL_RESULT: "ToolResult",
    EventKind.RETRYING: "Retrying",
    EventKind.SYSTEM: "SystemMessage",
    EventKind.THINKING: "Thinking",
    EventKind.TEXT_DELTA: "TextDelta",
    EventKind.BUDGET_RAISED: "BudgetRaised",
}


def pause_to_proto(data: dict[str, Any]) -> session_pb2.BudgetPause:
    """A BudgetPause's JSON (BudgetPause.to_json) as its message."""
    return session_pb2.BudgetPause(
        reason=session_pb2.PauseReason.Value(f"PAUSE_REASON_{data['reason']}"),
        since=timestamp(datetime.fromisoformat(data["since"])),
        deadline=timestamp(datetime.fromisoformat(data["deadline"])),
        pending_budget_usd=data.get("pending_budget_usd", ""),
    )


def on_budget_exhausted(value: int) -> OnBudgetExhausted | None:
    """RunSessionRequest.on_budget_exhausted (None: the tenant's default)."""
    if value == session_pb2.ON_BUDGET_EXHAUSTED_UNSPECIFIED:
        return None
    if value not in session_pb2.OnBudgetExhausted.values():
        raise InvalidArgument("on_budget_exhausted", f"{value} is not an OnBudgetExhausted")
    return OnBudgetExhausted(
        session_pb2.OnBudgetExhausted.Name(value).removeprefix("ON_BUDGET_EXHAUSTED_")
    )


def input_request_to_proto(r: InputRequest) -> session_pb2.InputRequest:
    return session_pb2.InputRequest(
        request_id=r.id,
        kind=session_pb2.InputKind.Value(f"INPUT_KIND_{r.kind.value}"),
        tool_name=r.tool_name,
        tool_use_id=r.tool_use_id,
        input_json=json.dumps(r.input, ensure_ascii=False),
        deadline=timestamp(r.deadline),
    )


def input_resolved_to_proto(data: dict[str, Any]) -> session_pb2.InputResolved:
    """The `input_resolved` event's data (InputAnswer.to_json) as its message."""
    return session_pb2.InputResolved(
        request_id=data["request_id"],
        kind=session_pb2.InputKind.Value(f"INPUT_KIND_{data['kind']}"),
        decided_by=session_pb2.Decider.Value(f"DECIDER_{data['decided_by']}"),
        outcome=data["outcome"],
        message=data["message"],
    )


def respond_request(msg: session_pb2.RespondRequest) -> tuple[InputKind, InputAnswer]:
    """The caller's answer of a Respond, and the kind of request it answers."""
    which = msg.WhichOneof("response")
    if which == "tool_result":
        result = msg.tool_result
        value: dict[str, Any] = {"text": result.text, "is_error": result.is_error}
        if result.structured_json:
            value["structured"] = _json_object(
                "tool_result.structured_json", result.structured_json
            )
        return InputKind.TOOL_CALL, InputAnswer(
            Decider.CALLER,
            "error" if result.is_error else "result",
            result.text if result.is_error else "",
            value,
        )
    if which == "permission":
        decision = msg.permission
        if not decision.allow:
            return InputKind.PERMISSION, InputAnswer(
                Decider.CALLER, "deny", decision.message or "denied by the caller", {"allow": False}
            )
        value = {"allow": True}
        if decision.updated_input_json:
            value["updated_input"] = _json_object(
                "permission.updated_input_json", decision.updated_input_json
            )
        return InputKind.PERMISSION, InputAnswer(
            Decider.CALLER, "allow_edited" if "updated_input" in value else "allow", "", value
        )
    if which == "answer":
        answers = dict(msg.answer.answers)
        for question, text in answers.items():
            if "\0" in question or "\0" in text:
                raise InvalidArgument("answer.answers", "must not contain NUL characters")
        return InputKind.QUESTION, InputAnswer(
            Decider.CALLER, "answered" if answers else "unanswered", "", {"answers": answers}
        )
    raise InvalidArgument("response", "one of tool_result, permission or answer is required")


def _json_object(field: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


def duration_s(msg: object, field: str) -> float:
    """A Duration field in seconds (0 when unset); InvalidArgument when negative."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return 0.0
    value: Duration = getattr(msg, field)
    if value.seconds < 0 or value.nanos < 0 or value.nanos > 999_999_999:
        raise InvalidArgument(field, "must be a positive duration")
    return value.seconds + value.nanos / 1e9


def run_request(msg: session_pb2.RunSessionRequest) -> RunRequest:
    return RunRequest(
        prompt=msg.prompt,
        request_id=msg.request_id.strip(),
        max_budget_usd=msg.max_budget_usd,
        max_turns=msg.max_turns,
        allowed_tools=tuple(msg.allowed_tools),
        model=msg.model,
        labels=dict(msg.labels),
        on_disconnect_continue=msg.on_disconnect == session_pb2.ON_DISCONNECT_CONTINUE,
        resume_session_id=msg.resume_session_id.strip(),
        caller_tools=tuple(
            CallerTool(t.name, t.description, t.input_schema_json) for t in msg.tools
        ),
        require_approval=tuple(msg.require_approval),
        answer_timeout_s=duration_s(msg, "answer_timeout"),
        include_partial_messages=msg.include_partial_messages,
        effort=msg.effort,
        max_thinking_tokens=msg.max_thinking_tokens,
        fallback_model=msg.fallback_model,
        callback_url=msg.callback_url,
        on_budget_exhausted=on_budget_exhausted(msg.on_budget_exhausted),
        output_schema_json=msg.output_schema_json,
        input_files=tuple(InputFile(f.path, f.content) for f in msg.input_files),
    )


def artifact_to_proto(a: Artifact) -> session_pb2.Artifact:
    return session_pb2.Artifact(
        path=a.path, size_bytes=a.size, sha256=a.sha256, omitted_reason=a.omitted_reason
    )


def money(value: Decimal) -> str:
    """Money on the wire: US dollars with exactly six decimals ("0.000000"), always."""
    return f"{usd(value):.6f}"


def budget_to_proto(
    w: BudgetWindow, *, max_session_budget: str, max_turns: int, max_concurrent: int
) -> budget_pb2.Budget:
    return budget_pb2.Budget(
        tenant=w.tenant,
        date=w.day,
        time_zone=w.time_zone,
        window_start=timestamp(w.window_start),
        window_end=timestamp(w.window_end),
        limit_usd=money(w.limit_usd),
        spent_usd=money(w.spent_usd),
        reserved_usd=money(w.reserved_usd),
        remaining_usd=money(w.remaining_usd),
        max_session_budget_usd=max_session_budget,
        max_turns=max_turns,
        max_concurrent_sessions=max_concurrent,
    )


def usage_to_proto(u: Usage) -> usage_pb2.Usage:
    return usage_pb2.Usage(
        tenant=u.tenant,
        start_time=timestamp(u.start),
        end_time=timestamp(u.end),
        sessions_total=u.sessions_total,
        sessions_succeeded=u.sessions_succeeded,
        sessions_failed=u.sessions_failed,
        failures_by_reason=u.failures_by_reason,
        success_rate=u.success_rate,
        total_cost_usd=money(u.total_cost_usd),
        average_cost_usd=money(u.average_cost_usd),
        total_turns=u.total_turns,
        tool_uses=u.tool_uses,
        models=[
            usage_pb2.ModelUsage(
                model=m.model,
                requests_total=m.requests_total,
                requests_by_outcome=m.requests_by_outcome,
                usage=token_usage(m.usage),
                cost_usd=money(m.cost_usd),
            )
            for m in u.models
        ],
        sessions_short=u.sessions_short,
        shortfall_usd=money(u.shortfall_usd),
    )


def token_usage(usage: TokenUsage) -> session_pb2.TokenUsage:
    """The proto's token counts, with the server-tool uses."""
    return session_pb2.TokenUsage(**usage.to_json(), server_tool_use=dict(usage.server_tool_use))
