"""The hook through which telemetry watches sessions, without `sessions` knowing of it.

Admission and the live sessions call an observer at admission (refused or admitted) and for every event a
live session publishes, `started` first and `result` last. An observer must be cheap and
must never raise: it runs on the session's own path.
"""

from __future__ import annotations

import contextvars
from decimal import Decimal
from typing import Any, Protocol

from ..domain import Event, Session


class SessionObserver(Protocol):
    """What SessionManager reports; telemetry implements it."""

    def rejected(self, tenant: str, reason: str) -> None:
        """A RunSession was refused; `reason` is the refusal's `AgentplaneError.reason`,
        the ErrorInfo reason its caller got (BUDGET_EXCEEDED, CONCURRENCY_LIMIT,
        INVALID_ARGUMENT, UNKNOWN_MODEL, UNAVAILABLE, DATABASE_UNAVAILABLE, ...)."""

    def current_trace(self) -> tuple[str, str]:
        """The trace id and span id (hex) of the call being served, which a session
        admitted now is part of; ("", "") when it is not traced."""

    def admitted(self, session: Session, prompt: str) -> contextvars.Context:
        """A session was admitted (IDLE, persisted). Returns the context its run task is
        created in (the current one, or a copy with the session's own trace span)."""

    def event(self, session: Session, event: Event) -> None:
        """A live session published `event`; at `result`, `session` is final."""

    def model_request(self, session: Session, request: Any) -> None:
        """The metering gateway settled one model request of the session (a
        MeteredRequest: model, tokens, cost, times, outcome)."""

    def pool_served(self, tenant: str, hit: bool) -> None:
        """A session of a tenant with a warm pool was admitted, served by a warm agent (hit)
        or started cold."""

    def shortfall(self, session: Session, model: str, gap_usd: Decimal) -> None:
        """An ending session's metered cost of `model` fell short of the CLI's own count
        by `gap_usd` (see money/shortfall.py)."""


class NullObserver:
    """Observes nothing."""

    def rejected(self, tenant: str, reason: str) -> None:
        pass

    def current_trace(self) -> tuple[str, str]:
        return "", ""

    def admitted(self, session: Session, prompt: str) -> contextvars.Context:
        return contextvars.copy_context()

    def event(self, session: Session, event: Event) -> None:
        pass

    def model_request(self, session: Session, request: Any) -> None:
        pass

    def pool_served(self, tenant: str, hit: bool) -> None:
        pass

    def shortfall(self, session: Session, model: str, gap_usd: Decimal) -> None:
        pass
