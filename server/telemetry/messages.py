"""Messages API content as the GenAI conventions' message JSON, for spans that record
content (`gen_ai.input.messages`, `gen_ai.output.messages`, `gen_ai.system_instructions`).

Each message is `{"role", "parts": [...]}` (output messages also carry `finish_reason`,
which the conventions' schema requires); every text is cut by the ContentPolicy, and input
messages are the newest ones that fit its size (at least the last one), since a
request carries the whole conversation so far.
"""

from __future__ import annotations

import json
from typing import Any

from .setup import ContentPolicy

# Anthropic's stop_reason -> the conventions' finish reason (others pass as they are).
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_call",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: str) -> str:
    """The conventions' finish reason for an Anthropic stop reason ("error": none)."""
    return _FINISH_REASONS.get(stop_reason, stop_reason) if stop_reason else "error"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text_of(content: Any) -> str:
    """A tool result's content (a string, or blocks) as text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(b.get("text", "")) if b.get("type") == "text" else f"[{b.get('type')}]"
            for b in content
            if isinstance(b, dict)
        )
    return ""


def _arguments(raw: Any, content: ContentPolicy) -> Any:
    """A tool call's input: the object, or its JSON text cut when it is too long."""
    if isinstance(raw, str):  # as streamed: JSON text
        try:
            raw = json.loads(raw) if raw else {}
        except ValueError:
            return content.cap(raw)
    text = _dumps(raw)
    return raw if len(text) <= content.max_chars else content.cap(text)


def _part(block: Any, content: ContentPolicy) -> dict[str, Any]:
    if isinstance(block, str):
        return {"type": "text", "content": content.cap(block)}
    if not isinstance(block, dict):
        return {"type": "unknown"}
    kind = str(block.get("type", "unknown"))
    if kind == "text":
        return {"type": "text", "content": content.cap(str(block.get("text", "")))}
    if kind == "thinking":
        return {"type": "reasoning", "content": content.cap(str(block.get("thinking", "")))}
    if kind == "tool_use":
        return {
            "type": "tool_call",
            "id": str(block.get("id", "")),
            "name": str(block.get("name", "")),
            "arguments": _arguments(block.get("input"), content),
        }
    if kind == "tool_result":
        return {
            "type": "tool_call_response",
            "id": str(block.get("tool_use_id", "")),
            "response": content.cap(_text_of(block.get("content"))),
        }
    return {"type": kind}  # images, documents, server tools: named, not recorded


def _message(message: Any, content: ContentPolicy) -> dict[str, Any]:
    if not isinstance(message, dict):
        return {"role": "user", "parts": []}
    blocks = message.get("content")
    blocks = blocks if isinstance(blocks, list) else [blocks] if blocks else []
    parts = [_part(b, content) for b in blocks]
    role = str(message.get("role", "user"))
    if role == "user" and parts and all(p["type"] == "tool_call_response" for p in parts):
        role = "tool"  # the conventions' role for tool results
    return {"role": role, "parts": parts}


def input_messages(body: bytes, content: ContentPolicy) -> tuple[str | None, str | None]:
    """A Messages request body's (newest) messages and its system instructions, as
    GenAI JSON; None for what it does not have (or a body that is not JSON)."""
    try:
        request = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(request, dict):
        return None, None
    messages = request.get("messages")
    kept: list[str] = []
    size = 0
    for message in reversed(messages if isinstance(messages, list) else []):
        text = _dumps(_message(message, content))
        if kept and size + len(text) > content.max_chars:
            break
        kept.append(text)
        size += len(text)
    system = request.get("system")
    blocks = system if isinstance(system, list) else [system] if system else []
    instructions = [_part(b, content) for b in blocks]
    return (
        "[" + ",".join(reversed(kept)) + "]" if kept else None,
        _dumps(instructions) if instructions else None,
    )


def output_messages(
    blocks: list[dict[str, Any]] | None, stop_reason: str, content: ContentPolicy
) -> str:
    """A reply's content blocks as the one GenAI output message (with its finish reason)."""
    parts = [_part(b, content) for b in blocks or ()]
    return _dumps(
        [{"role": "assistant", "parts": parts, "finish_reason": finish_reason(stop_reason)}]
    )


def text_messages(role: str, text: str, content: ContentPolicy, stop_reason: str = "") -> str:
    """One message of one text part (an output message when `stop_reason` is given)."""
    message: dict[str, Any] = {
        "role": role,
        "parts": [{"type": "text", "content": content.cap(text)}],
    }
    if stop_reason:
        message["finish_reason"] = finish_reason(stop_reason)
    return _dumps([message])
