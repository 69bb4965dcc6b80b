"""What one run of an agent produced: its verdict, cost, turns, tokens and result."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from claude_agent_sdk import ResultMessage

from ...domain import Artifact, ErrorReason, SessionState, TokenUsage, usd
from ...money.shortfall import ModelShortfall, cli_costs
from .translate import Verdict, verdict


@dataclass
class Outcome:
    """How a run (or one attempt of it) ended, and what it used."""

    verdict: Verdict
    cost_usd: Decimal = Decimal(0)
    num_turns: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    sdk_session_id: str = ""
    result: str = ""
    # The SDK's own running total for the conversation, as the CLI last reported it.
    sdk_total_usd: Decimal | None = None
    # The structured result the CLI reported (output_format), and the workspace's
    # artifacts once the run has ended.
    structured: Any = None
    artifacts: list[Artifact] = field(default_factory=list)
    # The CLI's own cost per model (its last report), and, once metered, the models whose
    # metered cost fell short of it (see shortfall.py).
    sdk_model_costs: dict[str, Decimal] = field(default_factory=dict)
    shortfalls: list[ModelShortfall] = field(default_factory=list)

    def plus(self, later: Outcome) -> Outcome:
        """The totals after a further attempt, which decides the verdict."""
        return Outcome(
            verdict=later.verdict,
            cost_usd=usd(self.cost_usd + later.cost_usd),
            num_turns=self.num_turns + later.num_turns,
            usage=self.usage.plus(later.usage),
            sdk_session_id=later.sdk_session_id or self.sdk_session_id,
            result=later.result,
            sdk_total_usd=later.sdk_total_usd
            if later.sdk_total_usd is not None
            else self.sdk_total_usd,
            structured=later.structured,
            sdk_model_costs=later.sdk_model_costs or self.sdk_model_costs,
        )

    def stopped(self, reason: ErrorReason, message: str) -> Outcome:
        """This outcome, ended by a stop request (cancel, shutdown, timeout)."""
        return replace(self, verdict=Verdict(SessionState.ERROR, reason, message), result="")

    @classmethod
    def failed(cls, message: str, reason: ErrorReason = ErrorReason.AGENT_FAILED) -> Outcome:
        """An end without a result of the agent's (it failed, or never ran)."""
        return cls(Verdict(SessionState.ERROR, reason, message[:2000]))

    @classmethod
    def of_result(cls, result: ResultMessage) -> Outcome:
        """What the CLI's ResultMessage reports."""
        total = usd(result.total_cost_usd or 0)
        return cls(
            verdict=verdict(result),
            cost_usd=total,
            num_turns=result.num_turns,
            usage=TokenUsage.from_api(result.usage or {}),  # the CLI's sum, API-shaped
            sdk_session_id=result.session_id or "",
            result=(result.result or "") if not result.is_error else "",
            sdk_total_usd=total,
            structured=result.structured_output if not result.is_error else None,
            sdk_model_costs=cli_costs(result.model_usage),
        )
