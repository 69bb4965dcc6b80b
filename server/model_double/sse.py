"""Messages API payloads: the full JSON message and its SSE event sequence."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from .script import Usage

_ALPHABET = string.ascii_letters + string.digits
_JSON_CHUNK = 24  # characters of tool input per input_json_delta
_TEXT_CHUNK = 16  # characters of text per text_delta


def new_id(prefix: str) -> str:
    """An id shaped like the real API's (``msg_01...``, ``toolu_01...``, ``req_01...``)."""
    return prefix + "01" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def usage_dict(usage: Usage, *, output_tokens: int | None = None) -> dict[str, Any]:
    """The ``usage`` object of a message (``output_tokens`` overridable: a stream's start
    reports 1, and its server tool uses only at the end, like the real API)."""
    data: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "output_tokens": usage.output_tokens if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }
    if usage.server_tool_use and output_tokens is None:
        data["server_tool_use"] = {"web_search_requests": 0, **usage.server_tool_use}
    return data


@dataclass
class Reply:
    """A complete assistant message, ready to be sent as JSON or as SSE."""

    model: str
    content: list[dict[str, Any]]
    stop_reason: str
    usage: Usage
    id: str = field(default_factory=lambda: new_id("msg_"))

    def message(self) -> dict[str, Any]:
        """The non-streaming response body."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.content,
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": usage_dict(self.usage),
        }

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The streaming events, in the order the real API sends them."""
        start = {**self.message(), "content": [], "stop_reason": None}
        start["usage"] = usage_dict(self.usage, output_tokens=1)
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            ("ping", {"type": "ping"}),
        ]
        for index, block in enumerate(self.content):
            events.extend(_block_events(index, block))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                    "usage": usage_dict(self.usage),
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if block["type"] in ("tool_use", "server_tool_use"):
        start = {**block, "input": {}}
        deltas = [
            {"type": "input_json_delta", "partial_json": part}
            for part in ["", *_chunks(json.dumps(block["input"]), _JSON_CHUNK)]
        ]
    elif block["type"] == "text":
        start = {"type": "text", "text": ""}
        deltas = [
            {"type": "text_delta", "text": part} for part in _chunks(block["text"], _TEXT_CHUNK)
        ]
    else:  # a server tool's result arrives whole with its start
        start, deltas = block, []
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        ),
    ]
    events.extend(
        ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        for d in deltas
    )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def encode_event(event: str, data: dict[str, Any]) -> bytes:
    """One SSE frame: ``event: X\\ndata: {json}\\n\\n``."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
