"""Usage from Messages API responses: SSE parsed on the side, or the JSON message.

The metering gateway forwards response bytes unchanged and feeds a copy to
:class:`SseUsageParser`, which only decodes the events that carry usage
(``message_start``, ``message_delta``) and ``error``, plus the content blocks' events
when it is asked to keep the reply's content (for traces).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

from ..domain import TokenUsage

_USAGE_EVENTS = frozenset({"message_start", "message_delta", "error"})
_CONTENT_EVENTS = _USAGE_EVENTS | {"content_block_start", "content_block_delta"}
# content_block_delta: the delta's type -> the block's field it extends.
_DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "input"}


@dataclass
class ResponseFacts:
    """What a response says of itself besides usage: its message id, the model that
    answered and why it stopped; and its content blocks when they were kept (tool_use
    blocks' ``input`` as the JSON text received)."""

    id: str = ""
    model: str = ""
    stop_reason: str = ""
    content: list[dict[str, Any]] | None = None

    def read_message(self, message: dict[str, Any]) -> None:
        """Take id, model and stop reason from a message (or a message_start's)."""
        for name in ("id", "model", "stop_reason"):
            value = message.get(name)
            if isinstance(value, str) and value:
                setattr(self, name, value)


class SseUsageParser:
    """Collects usage (and the response's facts) from an SSE byte stream fed in arbitrary
    chunks; with ``keep_content``, the reply's content blocks too."""

    def __init__(self, *, keep_content: bool = False) -> None:
        self.usage = TokenUsage()
        self.response = ResponseFacts(content=[] if keep_content else None)
        self._decoded = _CONTENT_EVENTS if keep_content else _USAGE_EVENTS
        self.saw_usage = False  # a message_start (or a delta with usage) was seen
        self.saw_stop = False  # message_stop: the message is complete
        self.error: dict[str, Any] | None = None  # the payload of an `error` event
        self._pending = b""
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def close(self) -> None:
        """End of stream: a last event without its blank line still counts."""
        if self._pending:
            self._line(self._pending.rstrip(b"\r"))
            self._pending = b""
        self._dispatch()

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return  # a comment
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"data" and (self._event is None or self._event in self._decoded):
            self._data.append(value)

    def _dispatch(self) -> None:
        event, data = self._event, self._data
        self._event, self._data = None, []
        if not data:
            if event == "message_stop":
                self.saw_stop = True
            return
        try:
            payload = json.loads(b"\n".join(data))
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        kind = payload.get("type", event)
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                self._merge(message.get("usage"))
                self.response.read_message(message)
        elif kind == "message_delta":
            self._merge(payload.get("usage"))
            delta = payload.get("delta")
            if isinstance(delta, dict):
                self.response.read_message(delta)
        elif kind in ("content_block_start", "content_block_delta"):
            self._content(payload)
        elif kind == "message_stop":
            self.saw_stop = True
        elif kind == "error":
            error = payload.get("error")
            self.error = error if isinstance(error, dict) else payload

    def _content(self, payload: dict[str, Any]) -> None:
        """A content block starts, or grows by a delta (only when content is kept)."""
        blocks = self.response.content
        if blocks is None:
            return
        block = payload.get("content_block")
        if isinstance(block, dict):
            blocks.append({**block, "input": ""} if block.get("type") == "tool_use" else block)
            return
        delta = payload.get("delta")
        if not isinstance(delta, dict) or not blocks:
            return
        key = _DELTA_FIELDS.get(str(delta.get("type")))
        value = delta.get("partial_json" if key == "input" else key or "")
        if key is not None and isinstance(value, str):
            last = blocks[-1]
            last[key] = str(last.get(key) or "") + value

    def _merge(self, usage: Any) -> None:
        """Fold in an event's ``usage`` object (ignored unless it is one). Delta counts
        are cumulative and newer APIs repeat the input counts there, so the response's
        usage is the field-wise maximum of everything seen."""
        if isinstance(usage, dict):
            self.usage = self.usage.max_with(TokenUsage.from_api(usage))
            self.saw_usage = True


def usage_from_message(raw: bytes, facts: ResponseFacts | None = None) -> TokenUsage | None:
    """The usage of a non-streaming response body, or None when it has none; fills
    `facts` (its content too when `facts.content` is a list) from the message."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    if facts is not None:
        facts.read_message(message)
        content = message.get("content")
        if facts.content is not None and isinstance(content, list):
            facts.content = content
    usage = message.get("usage")
    return TokenUsage.from_api(usage) if isinstance(usage, dict) else None


class SideDecoder:
    """Decompresses a copy of a response body for parsing (gzip/deflate); identity passes.

    The gateway asks upstream for ``identity``; this covers a proxy that compresses
    anyway. ``supported`` is False for encodings it cannot read (br, zstd).
    """

    def __init__(self, content_encoding: str | None) -> None:
        encoding = (content_encoding or "identity").strip().lower()
        self._inflate = None
        self.supported = True
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(wbits=47)  # gzip or zlib header, auto
        elif encoding != "identity":
            self.supported = False

    def decode(self, chunk: bytes) -> bytes:
        if not self.supported:
            return b""
        if self._inflate is None:
            return chunk
        try:
            return self._inflate.decompress(chunk)
        except zlib.error:
            self.supported = False
            return b""
