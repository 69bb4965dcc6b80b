"""The check of a session's metered cost against the agent CLI's own count.

The CLI prices every response it gets with its own model catalog and reports the total
(``sdk_cost_usd``) and a cost per model. The gateway's meter is what agentplane charges;
when it is lower than the CLI's count by more than :func:`tolerance`, agentplane's price
table lacks something the CLI knows (a model's premium, a per-use charge): the session
records the shortfall, and each model that fell short is logged and counted
(``agentplane.metering.shortfall``), so the gap shows up the day it appears.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..domain import usd

# A shortfall counts when it is more than 1 % of the CLI's count and more than a cent:
# rounding (the CLI counts in floats, the meter per request to the micro-dollar) never
# comes near either.
RATE = Decimal("0.01")
FLOOR_USD = Decimal("0.01")


def tolerance(cli_usd: Decimal) -> Decimal:
    """How far below ``cli_usd`` the metered cost may be without a shortfall."""
    return max(FLOOR_USD, cli_usd * RATE)


def session_shortfall(cli_usd: Decimal, metered_usd: Decimal) -> Decimal:
    """The CLI's count minus the metered cost when that exceeds the tolerance, else 0."""
    gap = cli_usd - metered_usd
    return usd(gap) if gap > tolerance(cli_usd) else usd(0)


@dataclass(frozen=True)
class ModelShortfall:
    """One model whose metered cost in a session was below the CLI's count of it."""

    model: str
    cli_usd: Decimal
    metered_usd: Decimal

    @property
    def gap_usd(self) -> Decimal:
        return usd(self.cli_usd - self.metered_usd)


def by_model(
    cli_usd: Decimal,
    metered_usd: Decimal,
    cli_by_model: Mapping[str, Decimal],
    metered_by_model: Mapping[str, Decimal],
    session_model: str,
) -> list[ModelShortfall]:
    """The models behind a session's shortfall (none when there is none): each model the
    CLI counted more for than was metered, or, when the CLI gave no count per model, the
    session's model with the totals."""
    if not session_shortfall(cli_usd, metered_usd):
        return []
    short = [
        ModelShortfall(model, usd(cost), usd(metered_by_model.get(model, Decimal(0))))
        for model, cost in sorted(cli_by_model.items())
        if cost > metered_by_model.get(model, Decimal(0))
    ]
    return short or [ModelShortfall(session_model, usd(cli_usd), usd(metered_usd))]


def cli_costs(model_usage: Mapping[str, Any] | None) -> dict[str, Decimal]:
    """The CLI's cost per model, from a ResultMessage's ``model_usage`` (its ``costUSD``
    per model; entries without one are left out)."""
    costs: dict[str, Decimal] = {}
    for model, entry in (model_usage or {}).items():
        cost = entry.get("costUSD") if isinstance(entry, Mapping) else None
        if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
            costs[str(model)] = usd(float(cost))
    return costs
