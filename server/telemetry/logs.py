"""Logs as one JSON object per line, with the trace and span ids of the current span.

A record's message is its `event` (session_start, tool_use, ...); fields given as
`extra={...}` become keys of their own. Anything shaped like an Anthropic API key or a
bearer token is masked, whatever logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

# Attributes every LogRecord has; the rest came in through `extra`.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)
_SECRETS = re.compile(
    r"(sk-ant-[A-Za-z0-9_\-]{4}|whsec_)[A-Za-z0-9_\-+/=]*|(Bearer\s+)\S+", re.IGNORECASE
)


def redact(text: str) -> str:
    """Mask API keys (keeping a short prefix), webhook signing secrets and bearer tokens."""
    return _SECRETS.sub(lambda m: f"{m.group(1)}***" if m.group(1) else f"{m.group(2)}***", text)


def span_ids(span: trace.Span | None = None) -> dict[str, str]:
    """trace_id and span_id of `span` (default: the current one), if it has them."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """time, level, logger, event, the record's extra fields (None ones left out),
    trace_id and span_id."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                out[key] = _jsonable(value)
        if "trace_id" not in out:
            out.update(span_ids())
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, ensure_ascii=False))


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr) as JSON lines, at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic announces its plugins at INFO on import; that is noise in a server log.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level)))
