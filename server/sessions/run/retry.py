"""Which failures are worth another attempt, and how long to wait before it."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...domain import ErrorReason

# Model API statuses that say "try again later" (after the CLI's own retries gave up).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits base * 2^(n-2), capped, times a
    random factor in [0.5, 1]."""

    attempts: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay_s(self, next_attempt: int, rng: random.Random | None = None) -> float:
        raw = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, next_attempt - 2))
        return raw * (0.5 + 0.5 * (rng or random).random())


def transient_api_failure(reason: ErrorReason | None, status: int | None) -> bool:
    """A model API failure that another attempt may get past (never a 4xx but 408/429)."""
    return reason is ErrorReason.MODEL_API_ERROR and (
        status is None or status in TRANSIENT_STATUSES
    )
