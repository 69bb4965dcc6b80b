"""The SessionObserver that turns a session's life into spans, metrics and log lines."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING

from ..domain import Event, EventKind, Session
from .guard import never_raises
from .logs import span_ids
from .metrics import METER_NAME, SessionMetrics
from .model_metrics import ModelRequestMetrics
from .setup import Telemetry
from .tracing import TRACER_NAME, SessionSpans

if TYPE_CHECKING:  # typing only: telemetry is handed the records, it never meters
    from ..gateway.meter import MeteredRequest

log = logging.getLogger(__name__)

_never_raises = never_raises


class TelemetryObserver:
    """Spans per session, model request and tool use, session metrics, and the
    model_request and tool_use log lines."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._tracer = telemetry.tracer_provider.get_tracer(TRACER_NAME)
        self._content = telemetry.content
        instruments = telemetry.instruments(METER_NAME)
        self.metrics = SessionMetrics(instruments)
        self.model_metrics = ModelRequestMetrics(instruments)
        self._spans: dict[str, SessionSpans] = {}

    @_never_raises
    def declare_tenants(self, tenants: Iterable[str]) -> None:
        """Zero series for each of `tenants` (at start, and for those a reload adds)."""
        for tenant in tenants:
            self.metrics.declare_tenant(tenant)

    @_never_raises
    def rejected(self, tenant: str, reason: str) -> None:
        self.metrics.rejected(tenant, reason)

    def current_trace(self) -> tuple[str, str]:
        ids = span_ids()
        return ids.get("trace_id", ""), ids.get("span_id", "")

    def admitted(self, session: Session, prompt: str) -> contextvars.Context:
        """Open the session's invoke_agent span under the current one (the RunSession
        server span) and return a context in which it is current, for the run task: the
        SDK then hands it to the CLI as TRACEPARENT."""
        run_context = contextvars.copy_context()
        spans = self._open(session, prompt)
        if spans is not None:
            run_context.run(spans.attach)
        return run_context

    @_never_raises
    def _open(self, session: Session, prompt: str) -> SessionSpans | None:
        spans = SessionSpans(self._tracer, session, prompt, self._content)
        self._spans[session.id] = spans
        self.metrics.admitted(session)
        return spans

    @_never_raises
    def pool_served(self, tenant: str, hit: bool) -> None:
        self.metrics.pool_served(tenant, hit)

    @_never_raises
    def shortfall(self, session: Session, model: str, gap_usd: Decimal) -> None:
        self.metrics.shortfall(session.tenant, model, gap_usd)

    @_never_raises
    def model_request(self, session: Session, request: MeteredRequest) -> None:
        """The request's chat span, metrics and log line (with that span's ids)."""
        self.model_metrics.settled(session.tenant, request)
        spans = self._spans.get(session.id)
        span = spans.model_request(request) if spans is not None else None
        ended = request.ended_at or request.started_at
        usage = request.usage
        log.info(
            "model_request",
            extra={
                "session_id": session.id,
                "tenant": session.tenant,
                "model": request.model,
                "status": request.status,
                "outcome": request.outcome,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "server_tool_use": dict(usage.server_tool_use) or None,
                "cost_usd": str(request.cost_usd),
                "duration_ms": round((ended - request.started_at).total_seconds() * 1000),
                "max_tokens": request.max_tokens_forwarded,
                "response_id": request.response.id or None,
                "upstream_request_id": request.upstream_request_id or None,
                **(span_ids(span) if span is not None else {}),
            },
        )

    @_never_raises
    def event(self, session: Session, event: Event) -> None:
        spans = self._spans.get(session.id)
        if spans is None:
            return
        if event.kind is EventKind.TOOL_USE:
            span = spans.tool_started(event)
            log.info(
                "tool_use",
                extra={
                    "session_id": session.id,
                    "tenant": session.tenant,
                    "tool": event.data.get("name", ""),
                    "tool_use_id": event.data.get("tool_use_id", ""),
                    **span_ids(span),
                },
            )
        elif event.kind is EventKind.TOOL_RESULT:
            finished = spans.tool_finished(event)
            if finished is not None:
                name, failed = finished
                self.metrics.tool_used(session.tenant, name, "error" if failed else "ok")
        elif event.kind is EventKind.INPUT_RESOLVED:
            spans.caller_input(event)
            self.metrics.caller_input(session.tenant, event.data)
        elif event.kind is EventKind.RETRYING:
            spans.retry(event)
            self.metrics.retried(session.tenant)
        elif event.kind is EventKind.RESULT:
            del self._spans[session.id]
            for name in spans.end(session):
                self.metrics.tool_used(session.tenant, name, "interrupted")
            self.metrics.ended_session(session)
