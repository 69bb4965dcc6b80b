"""Claude Agent SDK messages -> agentplane events, and a result -> a session outcome."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from ...domain import ErrorReason, EventKind, SessionState

EventData = tuple[EventKind, dict[str, Any]]


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            c.get("text", "")
            if isinstance(c, dict) and c.get("type") == "text"
            else json.dumps(c, default=str)
            for c in content
        ]
        return "\n".join(parts)
    return json.dumps(content, default=str)


def _without_paths(value: Any) -> Any:
    """`value` without the server's file paths (absolute ones: the session's folder, the
    CLI's socket, memory files), which callers have no use for and should not see."""

    def is_path(v: Any) -> bool:
        return isinstance(v, str) and v.startswith("/")

    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if not is_path(v)}
    if isinstance(value, list):
        return [_without_paths(v) for v in value if not is_path(v)]
    return value


def _tool_result(block: ToolResultBlock) -> EventData:
    return EventKind.TOOL_RESULT, {
        "tool_use_id": block.tool_use_id,
        "is_error": bool(block.is_error),
        "content": _text_of(block.content),
    }


def to_events(message: Any) -> list[EventData]:
    """The events one SDK message stands for (a ResultMessage is handled by the runner)."""
    if isinstance(message, AssistantMessage):
        events: list[EventData] = []
        for block in message.content:
            if isinstance(block, TextBlock):
                events.append(
                    (EventKind.ASSISTANT_TEXT, {"text": block.text, "model": message.model})
                )
            elif isinstance(block, ThinkingBlock):
                events.append((EventKind.THINKING, {"text": block.thinking}))
            elif isinstance(block, ToolUseBlock):
                events.append(
                    (
                        EventKind.TOOL_USE,
                        {
                            "tool_use_id": block.id,
                            "name": block.name,
                            "input_json": json.dumps(block.input, sort_keys=True),
                        },
                    )
                )
            elif isinstance(block, ToolResultBlock):
                events.append(_tool_result(block))
        if message.error:
            events.append(
                (
                    EventKind.SYSTEM,
                    {
                        "subtype": "assistant_error",
                        "data_json": json.dumps({"error": message.error}),
                    },
                )
            )
        return events
    if isinstance(message, UserMessage):
        if isinstance(message.content, list):
            return [_tool_result(b) for b in message.content if isinstance(b, ToolResultBlock)]
        return []
    if isinstance(message, SystemMessage):
        data = _without_paths(message.data) if message.subtype == "init" else message.data
        return [
            (
                EventKind.SYSTEM,
                {"subtype": message.subtype, "data_json": json.dumps(data, default=str)},
            )
        ]
    if isinstance(message, ResultMessage | StreamEvent):  # StreamEvent: see TextDeltas
        return []
    # Newer SDK message types (rate-limit notices, task events, ...) still become events.
    data = getattr(message, "__dict__", {"value": repr(message)})
    return [
        (
            EventKind.SYSTEM,
            {"subtype": type(message).__name__, "data_json": json.dumps(data, default=str)},
        )
    ]


class TextDeltas:
    """The text deltas of one CLI's partial messages (StreamEvents: the raw Messages API
    stream events), each with the id of the message it belongs to."""

    def __init__(self) -> None:
        # The message each stream (the agent's, or a subagent's tool use) is in.
        self._message: dict[str | None, str] = {}

    def read(self, message: StreamEvent) -> dict[str, Any] | None:
        """A `text_delta` event's data, or None for any other stream event."""
        event = message.event
        kind = event.get("type")
        if kind == "message_start":
            self._message[message.parent_tool_use_id] = str(event.get("message", {}).get("id", ""))
            return None
        delta = event.get("delta")
        if kind != "content_block_delta" or not isinstance(delta, dict):
            return None
        if delta.get("type") != "text_delta" or not delta.get("text"):
            return None
        return {
            "text": str(delta["text"]),
            "index": int(event.get("index") or 0),
            "message_id": self._message.get(message.parent_tool_use_id, ""),
        }


@dataclass(frozen=True)
class Verdict:
    """How a session ended, read from the SDK's ResultMessage."""

    state: SessionState
    reason: ErrorReason | None = None
    message: str = ""


def verdict(result: ResultMessage) -> Verdict:
    """Classify a ResultMessage, first rule that matches:

    - ``success`` without ``is_error``: COMPLETE;
    - subtype ``error_max_turns`` or terminal reason ``max_turns``: MAX_TURNS;
    - subtype ``error_max_budget_usd`` or terminal reason ``budget_exhausted``: BUDGET_EXCEEDED;
    - an ``api_error_status`` or terminal reason ``api_error`` (the CLI's own retries are
      spent by then): MODEL_API_ERROR, with the HTTP status and the errors (2000 chars at most);
    - anything else: AGENT_FAILED, naming the subtype, terminal reason and errors.
    """
    if result.subtype == "success" and not result.is_error:
        return Verdict(SessionState.COMPLETE)
    detail = "; ".join(result.errors or []) or (result.result or "")
    terminal = result.terminal_reason or ""
    if result.subtype == "error_max_turns" or terminal == "max_turns":
        return Verdict(
            SessionState.ERROR,
            ErrorReason.MAX_TURNS,
            f"the agent reached its limit of turns ({result.num_turns} taken)",
        )
    if result.subtype == "error_max_budget_usd" or terminal == "budget_exhausted":
        return Verdict(
            SessionState.ERROR, ErrorReason.BUDGET_EXCEEDED, "the session's budget was used up"
        )
    if result.api_error_status or terminal == "api_error":
        status = f"HTTP {result.api_error_status}" if result.api_error_status else "an error"
        return Verdict(
            SessionState.ERROR,
            ErrorReason.MODEL_API_ERROR,
            f"the model API answered {status} after the agent's retries: {detail}"[:2000],
        )
    return Verdict(
        SessionState.ERROR,
        ErrorReason.AGENT_FAILED,
        f"the agent ended with {result.subtype}"
        + (f" ({terminal})" if terminal else "")
        + (f": {detail}" if detail else ""),
    )
