"""Plain-text renderings of events, sessions and budgets for the CLI."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from ._values import (
    decider_name,
    delivery_state_name,
    input_kind_name,
    pause_reason_name,
    reason_name,
    state_name,
)
from .v1 import budget_pb2, session_pb2, webhook_pb2

TOOL_RESULT_CHARS = 200
TOOL_INPUT_CHARS = 200
SYSTEM_CHARS = 120


def to_json(message: Any, *, indent: int | None = None, all_fields: bool = False) -> str:
    """A message as JSON (proto field names; one line unless ``indent``; zero values
    too with ``all_fields``)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=all_fields
    )
    if indent is None:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(data, indent=indent, ensure_ascii=False)


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _compact_json(raw: str, limit: int) -> str:
    try:
        raw = json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        pass
    return shorten(raw, limit)


def _indent_rest(text: str, width: int) -> str:
    """Multi-line text with its continuation lines aligned under the first."""
    return text.replace("\n", "\n" + " " * width)


def money(value: str) -> str:
    return f"${value or '0'}"


def event_line(event: session_pb2.SessionEvent) -> str:
    """One line (or, for assistant text, one paragraph) per event: seq, kind, summary."""
    kind = event.WhichOneof("kind") or "unknown"
    prefix = f"{event.seq:>4} {kind:<14} "
    return prefix + _indent_rest(event_summary(event), len(prefix))


def event_summary(event: session_pb2.SessionEvent) -> str:
    kind = event.WhichOneof("kind")
    if kind == "started":
        s = event.started.session
        model = s.model or "default model"
        return (
            f"session {s.id} ({model}, budget {money(s.max_budget_usd)}, max {s.max_turns} turns)"
        )
    if kind == "assistant_text":
        return event.assistant_text.text
    if kind == "text_delta":
        return event.text_delta.text
    if kind == "thinking":
        return shorten(event.thinking.text, TOOL_RESULT_CHARS)
    if kind == "tool_use":
        use = event.tool_use
        return f"{use.name} {_compact_json(use.input_json, TOOL_INPUT_CHARS)}"
    if kind == "tool_result":
        result = event.tool_result
        mark = "error: " if result.is_error else ""
        return mark + shorten(result.content, TOOL_RESULT_CHARS)
    if kind == "retrying":
        r = event.retrying
        return f"attempt {r.attempt} in {r.delay_ms} ms: {shorten(r.reason, TOOL_RESULT_CHARS)}"
    if kind == "state_change":
        c = event.state_change
        return f"{state_name(c.from_state)} -> {state_name(c.to_state)}"
    if kind == "system":
        return system_summary(event.system.subtype, event.system.data_json)
    if kind == "input_request":
        return input_request_summary(event.input_request)
    if kind == "input_resolved":
        r = event.input_resolved
        text = f"{input_kind_name(r.kind)} {r.outcome} by {decider_name(r.decided_by)}"
        if r.message:
            text += f": {shorten(r.message, TOOL_RESULT_CHARS)}"
        return text
    if kind == "paused":
        p = event.paused
        return (
            f"at its budget of {money(p.max_budget_usd)} (spent {money(p.cost_usd)}): "
            f"raise it with `agentplane raise-budget` before {p.pause.deadline.ToJsonString()}"
        )
    if kind == "budget_raised":
        r = event.budget_raised
        return f"{money(r.previous_budget_usd)} -> {money(r.max_budget_usd)}"
    if kind == "result":
        s = event.result.session
        text = state_name(s.state)
        if s.state == session_pb2.SESSION_STATE_ERROR:
            text += f" {reason_name(s.error.reason)}"
        return text
    return ""


def input_request_summary(request: session_pb2.InputRequest) -> str:
    """ "PERMISSION Bash {"command":"ls"} (by 10:00:05Z)"; questions show their text and
    options."""
    what = f"{input_kind_name(request.kind)} {request.tool_name}"
    if request.kind == session_pb2.INPUT_KIND_QUESTION:
        what += " " + shorten(_questions_text(request.input_json), TOOL_INPUT_CHARS)
    else:
        what += " " + _compact_json(request.input_json, TOOL_INPUT_CHARS)
    if request.HasField("deadline"):
        what += f" (answer by {request.deadline.ToDatetime():%H:%M:%S}Z)"
    return what


def _questions_text(input_json: str) -> str:
    try:
        data = json.loads(input_json)
        texts = []
        for q in data.get("questions") or ():
            labels = " | ".join(str(o.get("label", "")) for o in q.get("options") or ())
            texts.append(f"{q.get('question', '')} [{labels}]" if labels else q.get("question", ""))
        return " ".join(texts)
    except (ValueError, AttributeError, TypeError):
        return input_json


def system_summary(subtype: str, data_json: str) -> str:
    """ "init model=M tools=A,B"; other subtypes: their data as compact JSON, cut short."""
    try:
        data = json.loads(data_json) if data_json else {}
    except ValueError:
        return f"{subtype} {shorten(data_json, SYSTEM_CHARS)}".rstrip()
    if not isinstance(data, dict):
        return f"{subtype} {_compact_json(data_json, SYSTEM_CHARS)}".rstrip()
    if subtype == "init":
        tools = data.get("tools")
        tools = ",".join(map(str, tools)) if isinstance(tools, list) else ""
        return f"init model={data.get('model', '')} tools={shorten(tools, SYSTEM_CHARS)}"
    rest = {k: v for k, v in data.items() if k not in _SYSTEM_NOISE}
    text = json.dumps(rest, separators=(",", ":"), ensure_ascii=False) if rest else ""
    return f"{subtype} {shorten(text, SYSTEM_CHARS)}".rstrip()


_SYSTEM_NOISE = frozenset({"type", "subtype", "session_id", "uuid"})


def structured_json(session: session_pb2.Session, indent: int | None = None) -> str:
    """The session's structured result as JSON (one line unless ``indent``); "" if none."""
    raw = session.structured_result_json
    if not raw:
        return ""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    separators = (",", ":") if indent is None else None
    return json.dumps(value, indent=indent, separators=separators, ensure_ascii=False)


def size(n: int) -> str:
    """ "512 B", "1.5 KiB", "2.0 MiB"."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def artifact_row(artifact: session_pb2.Artifact) -> str:
    """One line of `agentplane artifacts`: size, SHA-256 (cut short) and path, or why the
    file was left out."""
    digest = artifact.sha256[:12] if artifact.sha256 else "-"
    row = f"{size(artifact.size_bytes):>10}  {digest:<12}  {artifact.path}"
    if artifact.omitted_reason:
        row += f"  (not kept: {artifact.omitted_reason})"
    return row


def error_line(session: session_pb2.Session) -> str:
    """Why a session failed: "MODEL_API_ERROR: ..."."""
    return f"{reason_name(session.error.reason)}: {session.error.message}"


def summary_line(session: session_pb2.Session) -> str:
    """The last line of a run: state, cost, turns, tokens, session id."""
    u = session.usage
    tokens = f"{u.input_tokens} in/{u.output_tokens} out"
    cached = u.cache_creation_input_tokens + u.cache_read_input_tokens
    if cached:
        tokens += f"/{cached} cached"
    return (
        f"{state_name(session.state)}  cost {money(session.cost_usd)}  "
        f"turns {session.num_turns}  tokens {tokens}  session {session.id}"
    )


def session_row(session: session_pb2.Session) -> str:
    """One line of `agentplane list`."""
    created = session.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
    labels = ",".join(f"{k}={v}" for k, v in sorted(session.labels.items()))
    state = "PAUSED" if session.HasField("paused") else state_name(session.state)
    return (
        f"{session.id}  {state:<8}  {created}  "
        f"{money(session.cost_usd):>11}  {session.num_turns:>3} turns  {labels}"
    ).rstrip()


def session_details(session: session_pb2.Session) -> str:
    """`agentplane get`: the interesting fields, one per line."""
    rows: list[tuple[str, str]] = [
        ("id", session.id),
        ("tenant", session.tenant),
        ("state", state_name(session.state)),
    ]
    if session.HasField("paused"):
        rows.append(("paused", pause_line(session.paused)))
    if session.state == session_pb2.SESSION_STATE_ERROR:
        rows.append(("error", error_line(session)))
    for name in ("create_time", "start_time", "end_time"):
        if session.HasField(name):
            rows.append((name.replace("_", " "), getattr(session, name).ToJsonString()))
    u = session.usage
    rows += [
        ("model", session.model or "(default)"),
        ("cost", f"{money(session.cost_usd)} (sdk {money(session.sdk_cost_usd)})"),
        ("budget", money(session.max_budget_usd)),
        ("turns", f"{session.num_turns} of {session.max_turns}"),
        (
            "tokens",
            (
                f"{u.input_tokens} in, {u.output_tokens} out, "
                f"{u.cache_creation_input_tokens} cache write, "
                f"{u.cache_read_input_tokens} cache read"
            ),
        ),
        ("tools", ", ".join(session.allowed_tools)),
        ("caller tool", ", ".join(session.caller_tools)),
        ("approval", ", ".join(session.require_approval)),
        (
            "awaiting",
            ", ".join(
                f"{input_kind_name(r.kind)} {r.tool_name} ({r.request_id})"
                for r in session.awaiting
            ),
        ),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(session.labels.items()))),
        (
            "schema",
            _compact_json(session.output_schema_json, TOOL_INPUT_CHARS)
            if session.output_schema_json
            else "",
        ),
        ("request id", session.request_id),
        ("sdk session", session.sdk_session_id),
        ("trace id", session.trace_id),
    ]
    lines = [f"{name + ':':<13}{value}" for name, value in rows if value]
    if session.structured_result_json:
        lines.append("structured result:")
        lines.append(structured_json(session, indent=2))
    if session.result:
        lines.append("result:")
        lines.append(session.result)
    return "\n".join(lines)


def pause_line(pause: session_pb2.BudgetPause) -> str:
    """Why and until when a session is paused at its budget."""
    text = (
        f"{pause_reason_name(pause.reason)} since {pause.since.ToJsonString()}, "
        f"until {pause.deadline.ToJsonString()}"
    )
    if pause.pending_budget_usd:
        text += f"; raise to {money(pause.pending_budget_usd)} waits for the day's limit"
    return text


def delivery_row(delivery: webhook_pb2.WebhookDelivery) -> str:
    """One line of `agentplane deliveries`."""
    created = delivery.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
    last = delivery.attempts[-1] if delivery.attempts else None
    outcome = (
        f"{len(delivery.attempts)} attempts, last {last.http_status or last.error}"
        if last is not None
        else "no attempt yet"
    )
    return (
        f"{delivery.id}  {delivery_state_name(delivery.state):<9}  {created}  "
        f"{delivery.event:<16}  {delivery.endpoint}  {outcome}  {delivery.session_id}"
    ).rstrip()


def budget_details(budget: budget_pb2.Budget) -> str:
    """`agentplane budget`."""
    rows = [
        ("tenant", budget.tenant),
        ("date", f"{budget.date} ({budget.time_zone})"),
        ("window", f"{budget.window_start.ToJsonString()} .. {budget.window_end.ToJsonString()}"),
        ("limit", money(budget.limit_usd)),
        ("spent", money(budget.spent_usd)),
        ("reserved", money(budget.reserved_usd)),
        ("remaining", money(budget.remaining_usd)),
        ("per session", f"{money(budget.max_session_budget_usd)}, {budget.max_turns} turns"),
        ("concurrency", str(budget.max_concurrent_sessions)),
    ]
    return "\n".join(f"{name + ':':<13}{value}" for name, value in rows)
