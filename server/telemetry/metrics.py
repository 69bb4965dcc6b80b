"""The session metrics (OpenTelemetry instruments), their names and labels in one place."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ..domain import ErrorReason, Session, SessionState
from .instruments import Instruments

METER_NAME = "agentplane"

SESSIONS_STARTED = "agentplane.sessions.started"
SESSIONS_ENDED = "agentplane.sessions.ended"
SESSIONS_ACTIVE = "agentplane.sessions.active"
SESSION_DURATION = "agentplane.session.duration"
SESSION_COST = "agentplane.session.cost_usd"
SESSION_TURNS = "agentplane.session.turns"
SESSION_TOKENS = "agentplane.session.tokens"
SESSION_RETRIES = "agentplane.session.retries"
TOOL_USES = "agentplane.tool_uses"
ADMISSION_REJECTIONS = "agentplane.admission.rejections"
WARM_POOL_HITS = "agentplane.warm_pool.hits"
WARM_POOL_MISSES = "agentplane.warm_pool.misses"
CALLER_INPUTS = "agentplane.caller.inputs"
CALLER_WAIT = "agentplane.caller.wait"
METERING_SHORTFALL = "agentplane.metering.shortfall"

# Seconds: a session lasts from under a second to an hour.
DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The refusals an operator watches (the rest are the callers' mistakes); REPLICA_FULL, counted
# where it was refused (the caller retried elsewhere), says the fleet runs near its capacity.
QUOTA_REASONS = ("BUDGET_EXCEEDED", "CONCURRENCY_LIMIT", "REPLICA_FULL")


class SessionMetrics:
    """Counts sessions, their cost, turns, tokens and tool uses, and refused admissions.

    Labels: `tenant` everywhere; `outcome` (COMPLETE or ERROR) and `reason` (the
    ErrorReason, "" on success) on ended sessions; `tool` and `outcome` (ok, error,
    interrupted) on tool uses; `reason` on rejections; `type` on tokens; `model` on
    metering shortfalls.
    """

    def __init__(self, instruments: Instruments) -> None:
        self.started = instruments.counter(SESSIONS_STARTED, "{session}", "Sessions admitted")
        self.ended = instruments.counter(SESSIONS_ENDED, "{session}", "Sessions ended, by outcome")
        self.active = instruments.up_down_counter(
            SESSIONS_ACTIVE, "{session}", "Sessions admitted and not ended"
        )
        self.duration = instruments.histogram(
            SESSION_DURATION, "s", "Session run time (admission to end)", DURATION_BUCKETS
        )
        self.cost = instruments.counter(SESSION_COST, "{USD}", "Cost of ended sessions")
        self.turns = instruments.counter(SESSION_TURNS, "{turn}", "Agent turns of ended sessions")
        self.tokens = instruments.counter(
            SESSION_TOKENS, "{token}", "Model tokens of ended sessions, by type"
        )
        self.retries = instruments.counter(
            SESSION_RETRIES, "{retry}", "Retries of transient failures"
        )
        self.tool_uses = instruments.counter(TOOL_USES, "{call}", "Tool calls, by tool and outcome")
        self.rejections = instruments.counter(
            ADMISSION_REJECTIONS, "{request}", "Refused RunSession requests"
        )
        self.pool_hits = instruments.counter(
            WARM_POOL_HITS, "{session}", "Sessions served by a warm agent"
        )
        self.pool_misses = instruments.counter(
            WARM_POOL_MISSES,
            "{session}",
            "Sessions of tenants with a warm pool that started cold",
        )
        self.caller_inputs = instruments.counter(
            CALLER_INPUTS,
            "{request}",
            "Requests to callers (tool calls, approvals, questions), by who "
            "settled them (CALLER, TIMEOUT, SESSION_END) and how",
        )
        self.caller_wait = instruments.histogram(
            CALLER_WAIT, "s", "How long sessions waited for their callers", DURATION_BUCKETS
        )
        self.shortfalls = instruments.counter(
            METERING_SHORTFALL,
            "{USD}",
            "How far metered costs fell short of the agent CLI's own count, by "
            "model (a price the table lacks)",
        )

    def declare_tenant(self, tenant: str) -> None:
        """Zero series for `tenant` (see instruments.py): sessions started, active and
        ended (by outcome and reason), their cost, and the refusals an operator alerts on."""
        labels = {"tenant": tenant}
        for counter in (self.started, self.cost, self.active):
            counter.add(0, labels)
        self.ended.add(0, {**labels, "outcome": SessionState.COMPLETE.value, "reason": ""})
        for error in ErrorReason:
            self.ended.add(
                0, {**labels, "outcome": SessionState.ERROR.value, "reason": error.value}
            )
        for refusal in QUOTA_REASONS:
            self.rejections.add(0, {**labels, "reason": refusal})

    def shortfall(self, tenant: str, model: str, gap_usd: Decimal) -> None:
        self.shortfalls.add(float(gap_usd), {"tenant": tenant, "model": model})

    def admitted(self, session: Session) -> None:
        labels = {"tenant": session.tenant}
        self.started.add(1, labels)
        self.active.add(1, labels)

    def rejected(self, tenant: str, reason: str) -> None:
        self.rejections.add(1, {"tenant": tenant, "reason": reason})

    def pool_served(self, tenant: str, hit: bool) -> None:
        (self.pool_hits if hit else self.pool_misses).add(1, {"tenant": tenant})

    def retried(self, tenant: str) -> None:
        self.retries.add(1, {"tenant": tenant})

    def tool_used(self, tenant: str, tool: str, outcome: str) -> None:
        self.tool_uses.add(1, {"tenant": tenant, "tool": tool, "outcome": outcome})

    def caller_input(self, tenant: str, data: dict[str, Any]) -> None:
        """An input request was settled (the `input_resolved` event's data)."""
        kind = {"tenant": tenant, "kind": str(data.get("kind", ""))}
        self.caller_inputs.add(
            1,
            {
                **kind,
                "decided_by": str(data.get("decided_by", "")),
                "outcome": str(data.get("outcome", "")),
            },
        )
        self.caller_wait.record(int(data.get("waited_ms", 0)) / 1000, kind)

    def ended_session(self, final: Session) -> None:
        tenant = {"tenant": final.tenant}
        outcome = {
            **tenant,
            "outcome": final.state.value,
            "reason": final.error_reason.value if final.error_reason else "",
        }
        self.active.add(-1, tenant)
        self.ended.add(1, outcome)
        if final.end_time is not None:
            seconds = (final.end_time - final.create_time).total_seconds()
            self.duration.record(max(seconds, 0.0), {**tenant, "outcome": final.state.value})
        self.cost.add(float(final.cost_usd), tenant)
        self.turns.add(final.num_turns, tenant)
        usage = final.usage
        for kind, count in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_input_tokens),
            ("cache_creation", usage.cache_creation_input_tokens),
        ):
            if count:
                self.tokens.add(count, {**tenant, "type": kind})
