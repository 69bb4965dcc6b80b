"""Usage from Messages API responses: SSE parsed on the side, or the JSON message.

The metering gateway forwards response bytes unchanged and feeds a copy to
:class:`SseUsageParser`, which only decodes the events that carry usage
(``message_start``, ``message_delta``) and ``error``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, fields
from typing import Any

_USAGE_EVENTS = frozenset({"message_start", "message_delta", "error"})


@dataclass
class ResponseUsage:
    """Token counts of one response (``cache_creation_1h_input_tokens`` is the part of
    the cache writes made with a 1-hour TTL)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0

    def merge_max(self, usage: Any) -> bool:
        """Raise each count to the one in the API's ``usage`` dict; False if not a dict.

        ``message_delta`` counts are cumulative and newer APIs repeat the input counts
        there, so the maximum of everything seen is the response's usage.
        """
        if not isinstance(usage, dict):
            return False
        counts = dict(usage)
        detail = usage.get("cache_creation")
        if isinstance(detail, dict):
            counts.setdefault(
                "cache_creation_1h_input_tokens", detail.get("ephemeral_1h_input_tokens")
            )
        for f in fields(self):
            value = counts.get(f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                setattr(self, f.name, max(getattr(self, f.name), value))
        return True


class SseUsageParser:
    """Collects usage from an SSE byte stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self.usage = ResponseUsage()
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
            if isinstance(message, dict) and self.usage.merge_max(message.get("usage")):
                self.saw_usage = True
        elif kind == "message_delta":
            if self.usage.merge_max(payload.get("usage")):
                self.saw_usage = True
        elif kind == "message_stop":
            self.saw_stop = True
        elif kind == "error":
            error = payload.get("error")
            self.error = error if isinstance(error, dict) else payload


def usage_from_message(raw: bytes) -> ResponseUsage | None:
    """The usage of a non-streaming response body, or None when it has none."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    usage = ResponseUsage()
    return usage if usage.merge_max(message.get("usage")) else None


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
