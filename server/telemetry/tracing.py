"""Span names and attributes (OpenTelemetry GenAI conventions) in one place, and the spans
of one session: `invoke_agent {agent}` with a `chat {model}` child per model request and an
`execute_tool {tool}` child per tool use.

Tool spans get their real start and end times from the session's tool_use and
tool_result events, chat spans from the gateway's record of the request. Token counts
follow the conventions: `gen_ai.usage.input_tokens` includes the cache reads and writes
(Anthropic's `input_tokens` does not), which the cache attributes break down. Prompts,
messages and tool inputs/outputs go on spans only when the ContentPolicy says so, cut to
its size.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..domain import Event, Session, SessionState, TokenUsage
from . import messages
from .setup import ContentPolicy

if TYPE_CHECKING:  # typing only: telemetry is handed the records, it never meters
    from ..gateway.meter import MeteredRequest

TRACER_NAME = "agentplane"
PROVIDER = "anthropic"

INVOKE_AGENT = "invoke_agent"
EXECUTE_TOOL = "execute_tool"
CHAT = "chat"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
FINISH_REASONS = "gen_ai.response.finish_reasons"
HTTP_STATUS = "http.response.status_code"

# GenAI semantic conventions.
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
AGENT_NAME = "gen_ai.agent.name"
CONVERSATION_ID = "gen_ai.conversation.id"
REQUEST_MODEL = "gen_ai.request.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
CACHE_CREATION_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_TYPE = "gen_ai.tool.type"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"
ERROR_TYPE = "error.type"
# agentplane's own.
SESSION_ID = "session.id"
TENANT = "agentplane.tenant"
COST_USD = "agentplane.cost_usd"
NUM_TURNS = "agentplane.num_turns"
SESSION_STATE = "agentplane.session.state"
OUTCOME = "agentplane.model_request.outcome"
UPSTREAM_REQUEST_ID = "agentplane.upstream.request_id"
# OpenInference's input/output of a span (what LLM viewers show in their lists).
INPUT_VALUE = "input.value"
OUTPUT_VALUE = "output.value"
USER_ID = "user.id"  # the tenant
METADATA = "metadata"  # OpenInference: the session's labels, as a JSON object
LABEL_PREFIX = "agentplane.label."
RETRY_EVENT = "agentplane.retry"
# A wait for the caller ended (on invoke_agent; its tool's span gets the decision too).
CALLER_INPUT_EVENT = "agentplane.caller_input"

TOOL_ERROR = "tool_error"


def ns(when: datetime) -> int:
    """A datetime as OpenTelemetry's nanoseconds since the epoch."""
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def label_attributes(labels: dict[str, str]) -> dict[str, str]:
    """A session's labels: one `agentplane.label.{key}` each, and `metadata` (JSON)."""
    if not labels:
        return {}
    return {
        METADATA: json.dumps(labels, sort_keys=True),
        **{LABEL_PREFIX + key: value for key, value in labels.items()},
    }


def usage_attributes(usage: TokenUsage) -> dict[str, int]:
    """Token counts as the GenAI conventions define them: input includes the cache."""
    return {
        INPUT_TOKENS: usage.input_tokens
        + usage.cache_read_input_tokens
        + usage.cache_creation_input_tokens,
        OUTPUT_TOKENS: usage.output_tokens,
        CACHE_READ_TOKENS: usage.cache_read_input_tokens,
        CACHE_CREATION_TOKENS: usage.cache_creation_input_tokens,
    }


class SessionSpans:
    """The spans of one session; the invoke_agent span is current in `context`."""

    def __init__(
        self, tracer: trace.Tracer, session: Session, prompt: str, content: ContentPolicy
    ) -> None:
        self._tracer = tracer
        self._content = content
        attributes: dict[str, Any] = {
            OPERATION_NAME: INVOKE_AGENT,
            PROVIDER_NAME: PROVIDER,
            AGENT_NAME: session.tenant,
            CONVERSATION_ID: session.id,
            SESSION_ID: session.id,
            TENANT: session.tenant,
            USER_ID: session.tenant,
            **label_attributes(session.labels),
        }
        if session.model:
            attributes[REQUEST_MODEL] = session.model
        if content.capture:
            attributes[INPUT_MESSAGES] = messages.text_messages("user", prompt, content)
            attributes[INPUT_VALUE] = content.cap(prompt)
        self.span: Span = tracer.start_span(
            f"{INVOKE_AGENT} {session.tenant}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=ns(session.create_time),
        )
        self.context = trace.set_span_in_context(self.span)
        self._tools: dict[str, tuple[Span, str]] = {}
        # The model that last answered (the CLI picks one when the caller asked none).
        self._model = session.model

    def attach(self) -> None:
        """Make the invoke_agent span current in the running context."""
        otel_context.attach(self.context)

    def tool_started(self, event: Event) -> Span:
        """Open the execute_tool span of a tool_use event (at the event's time)."""
        name = str(event.data.get("name", ""))
        call_id = str(event.data.get("tool_use_id", ""))
        attributes: dict[str, Any] = {
            OPERATION_NAME: EXECUTE_TOOL,
            TOOL_NAME: name,
            TOOL_CALL_ID: call_id,
            TOOL_TYPE: "function",
            SESSION_ID: event.session_id,
        }
        if self._content.capture:
            attributes[TOOL_ARGUMENTS] = self._content.cap(str(event.data.get("input_json", "")))
        span = self._tracer.start_span(
            f"{EXECUTE_TOOL} {name}",
            context=self.context,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=ns(event.time),
        )
        self._tools[call_id] = (span, name)
        return span

    def tool_finished(self, event: Event) -> tuple[str, bool] | None:
        """Close the span of a tool_result event; the tool's name and whether it failed
        (None: not a tool call of this session)."""
        found = self._tools.pop(str(event.data.get("tool_use_id", "")), None)
        if found is None:
            return None
        span, name = found
        failed = bool(event.data.get("is_error"))
        if self._content.capture:
            span.set_attribute(TOOL_RESULT, self._content.cap(str(event.data.get("content", ""))))
        if failed:
            span.set_attribute(ERROR_TYPE, TOOL_ERROR)
            span.set_status(Status(StatusCode.ERROR, "the tool reported an error"))
        span.end(end_time=ns(event.time))
        return name, failed

    def model_request(self, request: MeteredRequest) -> Span:
        """A `chat {model}` span for one model request the gateway metered, with its real
        start and end times, tokens, cost, HTTP status and what the response said of
        itself (and its messages, when content is recorded)."""
        response = request.response
        attributes: dict[str, Any] = {
            OPERATION_NAME: CHAT,
            PROVIDER_NAME: PROVIDER,
            REQUEST_MODEL: request.model,
            **usage_attributes(request.usage),
            COST_USD: str(request.cost_usd),
            OUTCOME: request.outcome,
        }
        if request.max_tokens_forwarded is not None:
            attributes[REQUEST_MAX_TOKENS] = request.max_tokens_forwarded
        if request.status is not None:
            attributes[HTTP_STATUS] = request.status
        if request.upstream_request_id:
            attributes[UPSTREAM_REQUEST_ID] = request.upstream_request_id
        if response.id:
            attributes[RESPONSE_ID] = response.id
        if response.model:
            attributes[RESPONSE_MODEL] = response.model
        if response.stop_reason:
            attributes[FINISH_REASONS] = [messages.finish_reason(response.stop_reason)]
        if self._content.capture:
            attributes.update(self._chat_content(request))
        span = self._tracer.start_span(
            f"{CHAT} {request.model}",
            context=self.context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=ns(request.started_at),
        )
        if request.outcome != "completed":
            span.set_attribute(ERROR_TYPE, request.outcome or "error")
            span.set_status(
                Status(StatusCode.ERROR, f"model request {request.outcome} ({request.status})")
            )
        if request.outcome == "completed" or response.model:
            self._model = response.model or request.model
        span.end(end_time=ns(request.ended_at or request.started_at))
        return span

    def _chat_content(self, request: MeteredRequest) -> dict[str, str]:
        attributes: dict[str, str] = {}
        if request.request_body is not None:
            sent, system = messages.input_messages(request.request_body, self._content)
            if sent is not None:
                attributes[INPUT_MESSAGES] = sent
            if system is not None:
                attributes[SYSTEM_INSTRUCTIONS] = system
        response = request.response
        if response.content is not None and (response.content or response.stop_reason):
            attributes[OUTPUT_MESSAGES] = messages.output_messages(
                response.content, response.stop_reason, self._content
            )
        return attributes

    def retry(self, event: Event) -> None:
        self.span.add_event(
            RETRY_EVENT,
            {
                "attempt": int(event.data.get("attempt", 0)),
                "delay_ms": int(event.data.get("delay_ms", 0)),
            },
            timestamp=ns(event.time),
        )

    def caller_input(self, event: Event) -> None:
        """An `input_resolved` event: how long the session waited, who decided what."""
        data = event.data
        attributes: dict[str, str | int] = {
            "agentplane.input.kind": str(data.get("kind", "")),
            "agentplane.input.tool": str(data.get("tool_name", "")),
            "agentplane.input.decided_by": str(data.get("decided_by", "")),
            "agentplane.input.outcome": str(data.get("outcome", "")),
            "agentplane.input.waited_ms": int(data.get("waited_ms", 0)),
        }
        self.span.add_event(CALLER_INPUT_EVENT, attributes, timestamp=ns(event.time))
        tool = self._tools.get(str(data.get("tool_use_id", "")))
        if tool is not None:
            tool[0].set_attributes(attributes)

    def end(self, final: Session) -> list[str]:
        """Close the session span with its outcome (and any tool span still open, as
        interrupted); returns the names of those interrupted tools."""
        end_time = ns(final.end_time) if final.end_time else None
        reason = final.error_reason.value if final.error_reason else "ERROR"
        interrupted = [name for _, name in self._tools.values()]
        for span, _ in self._tools.values():
            span.set_attribute(ERROR_TYPE, reason)
            span.set_status(Status(StatusCode.ERROR, "the session ended before the tool did"))
            span.end(end_time=end_time)
        self._tools.clear()
        span = self.span
        span.set_attributes(
            {
                CONVERSATION_ID: final.sdk_session_id or final.id,
                **usage_attributes(final.usage),
                COST_USD: float(final.cost_usd),
                NUM_TURNS: final.num_turns,
                SESSION_STATE: final.state.value,
            }
        )
        model = self._model or final.model
        if model:
            span.set_attribute(RESPONSE_MODEL, model)
        if final.state is SessionState.ERROR:
            span.set_attribute(ERROR_TYPE, reason)
            span.set_status(Status(StatusCode.ERROR, final.error_message[:500]))
        elif self._content.capture and final.result:
            span.set_attributes(
                {
                    OUTPUT_MESSAGES: messages.text_messages(
                        "assistant", final.result, self._content, stop_reason="end_turn"
                    ),
                    OUTPUT_VALUE: self._content.cap(final.result),
                }
            )
        span.end(end_time=end_time)
        return interrupted
