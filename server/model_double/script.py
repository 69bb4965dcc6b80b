"""The script model: what the sandbox model answers, step by step.

A :class:`Script` is a list of :class:`Step`; step ``i`` answers the request whose
``messages`` hold ``i`` assistant messages. Scripts round-trip through plain dicts
(:meth:`Script.to_dict` / :meth:`Script.from_dict`) so they can live in JSON files
(:func:`load_scripts`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Anthropic error type per HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    """Return the Anthropic error type the real API uses for ``status``."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def _check_keys(kind: str, data: dict[str, Any], allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise TypeError(f"{kind} must be an object, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {kind} field(s): {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class Usage:
    """Usage reported for one model response: tokens, and the server-side tool uses
    (``server_tool_use``: count name -> uses, e.g. ``{"web_search_requests": 3}``).

    A response reporting ``web_search_requests`` carries that many searches (a
    ``server_tool_use`` block and its ``web_search_tool_result`` each), at most the
    ``max_uses`` of the request's web search tool, as the real API does.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    server_tool_use: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "server_tool_use"
        }
        if self.server_tool_use:
            data["server_tool_use"] = dict(self.server_tool_use)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        _check_keys("usage", data, {f.name for f in fields(cls)})
        uses = data.get("server_tool_use") or {}
        if not isinstance(uses, dict):
            raise TypeError("usage.server_tool_use must be an object of count name -> uses")
        return cls(
            **{k: int(v) for k, v in data.items() if k != "server_tool_use"},
            server_tool_use={str(k): int(v) for k, v in uses.items()},
        )


def _default_usage() -> Usage:
    return Usage(input_tokens=100, output_tokens=20)


@dataclass(frozen=True)
class ToolCall:
    """One ``tool_use`` block; ``id=None`` gets a fresh ``toolu_...`` id per response."""

    name: str
    input: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "input": self.input}
        if self.id is not None:
            data["id"] = self.id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolCall:
        _check_keys("tool call", data, {"name", "input", "id"})
        if "name" not in data:
            raise ValueError("a tool call needs a name")
        return cls(name=data["name"], input=dict(data.get("input") or {}), id=data.get("id"))


@dataclass(frozen=True)
class HttpFailure:
    """An HTTP error reply with an Anthropic-style JSON body.

    ``should_retry`` sets the ``x-should-retry`` header when not None; ``error_type``
    overrides the type derived from ``status``; ``retry_after`` sets ``retry-after``.
    """

    status: int
    should_retry: bool | None = None
    message: str = "Sandbox scripted failure"
    error_type: str | None = None
    retry_after: float | None = None

    def body(self) -> dict[str, Any]:
        """The JSON error body the real API sends."""
        return {
            "type": "error",
            "error": {
                "type": self.error_type or error_type_for(self.status),
                "message": self.message,
            },
        }

    def headers(self) -> dict[str, str]:
        """Extra response headers for this failure."""
        headers: dict[str, str] = {}
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        if self.retry_after is not None:
            headers["retry-after"] = f"{self.retry_after:g}"
        return headers

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": self.status}
        defaults = HttpFailure(self.status)
        for name in ("should_retry", "message", "error_type", "retry_after"):
            if getattr(self, name) != getattr(defaults, name):
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HttpFailure:
        _check_keys("failure", data, {f.name for f in fields(cls)})
        if "status" not in data:
            raise ValueError("a failure needs a status")
        return cls(**data)


@dataclass(frozen=True)
class Step:
    """One scripted model response (and how delivering it misbehaves).

    - ``text`` / ``tool_calls``: the content blocks, text first.
    - ``stop_reason``: defaults to ``tool_use`` with tool calls, else ``end_turn``.
    - ``model``: the model echoed back; defaults to the request's model.
    - ``delay_s``: wait this long before the response headers.
    - ``failures``: the first ``len(failures)`` attempts of this step get these errors.
    - ``fail_always``: every attempt gets this error.
    - ``hang``: never answer; hold the connection until the client or the server goes.
    - ``stall_after_events`` / ``drop_after_events``: streaming only; send that many SSE
      events, then hang / close the connection abruptly. A non-streaming request for
      the step (the CLI's fallback after a broken stream) is answered normally.
    """

    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=_default_usage)
    model: str | None = None
    delay_s: float = 0
    failures: list[HttpFailure] = field(default_factory=list)
    fail_always: HttpFailure | None = None
    hang: bool = False
    stall_after_events: int | None = None
    drop_after_events: int | None = None
    stop_reason: str | None = None

    @property
    def effective_stop_reason(self) -> str:
        """The stop reason sent with this step."""
        if self.stop_reason is not None:
            return self.stop_reason
        return "tool_use" if self.tool_calls else "end_turn"

    def failure_for(self, attempt: int) -> HttpFailure | None:
        """The failure for the 1-based ``attempt`` of this step, if any."""
        if self.fail_always is not None:
            return self.fail_always
        if 1 <= attempt <= len(self.failures):
            return self.failures[attempt - 1]
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict holding only the fields that differ from the defaults."""
        defaults = Step()
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name):
                continue
            if f.name in ("tool_calls", "failures"):
                data[f.name] = [item.to_dict() for item in value]
            elif f.name in ("usage", "fail_always"):
                data[f.name] = value.to_dict()
            else:
                data[f.name] = value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        _check_keys("step", data, {f.name for f in fields(cls)})
        kwargs: dict[str, Any] = dict(data)
        if "tool_calls" in kwargs:
            kwargs["tool_calls"] = [ToolCall.from_dict(t) for t in kwargs["tool_calls"]]
        if "failures" in kwargs:
            kwargs["failures"] = [HttpFailure.from_dict(f) for f in kwargs["failures"]]
        if "usage" in kwargs:
            kwargs["usage"] = Usage.from_dict(kwargs["usage"])
        if kwargs.get("fail_always") is not None:
            kwargs["fail_always"] = HttpFailure.from_dict(kwargs["fail_always"])
        return cls(**kwargs)


@dataclass(frozen=True)
class Script:
    """An ordered list of steps, one per model request of a conversation."""

    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [step.to_dict() for step in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Script:
        _check_keys("script", data, {"steps"})
        return cls(steps=[Step.from_dict(s) for s in data.get("steps", [])])


def scripts_from_dict(data: dict[str, Any]) -> dict[str, Script]:
    """Parse ``{"name": {"steps": [...]}, ...}`` into scripts."""
    if not isinstance(data, dict):
        raise TypeError("a scripts file must hold a JSON object of name -> script")
    return {str(name): Script.from_dict(script) for name, script in data.items()}


def load_scripts(path: str | os.PathLike[str]) -> dict[str, Script]:
    """Load named scripts from a JSON file (``{"name": {"steps": [...]}}``)."""
    return scripts_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
