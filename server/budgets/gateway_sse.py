"""Usage from Messages API responses: SSE parsed on the side, or the JSON message.

The metering gateway forwards response bytes unchanged and feeds a copy to
:class:`SseUsageParser`, which only decodes the events that carry usage
(``message_start``, ``message_delta``) and ``error``.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from ..domain import TokenUsage

_USAGE_EVENTS = frozenset({"message_start", "message_delta", "error"})


class SseUsageParser:
    """Collects usage from an SSE byte stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self.usage = TokenUsage()
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
        elif name == b"data" and (self._event is None or self._event in _USAGE_EVENTS):
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
        elif kind == "message_delta":
            self._merge(payload.get("usage"))
        elif kind == "message_stop":
            self.saw_stop = True
        elif kind == "error":
            error = payload.get("error")
            self.error = error if isinstance(error, dict) else payload

    def _merge(self, usage: Any) -> None:
        """Fold in an event's ``usage`` object (ignored unless it is one). Delta counts
        are cumulative and newer APIs repeat the input counts there, so the response's
        usage is the field-wise maximum of everything seen."""
        if isinstance(usage, dict):
            self.usage = self.usage.max_with(TokenUsage.from_api(usage))
            self.saw_usage = True


def usage_from_message(raw: bytes) -> TokenUsage | None:
    """The usage of a non-streaming response body, or None when it has none."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    usage = message.get("usage") if isinstance(message, dict) else None
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
