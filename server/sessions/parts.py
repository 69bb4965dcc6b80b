"""What the parts of the sessions room share, made once: so that adding one shared
collaborator edits this file, not every constructor that passes it on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..webhooks.outbox import WebhookOutbox
from .capacity import Capacity
from .observer import NullObserver, SessionObserver
from .records.queries import SessionQueries


@dataclass(frozen=True)
class SessionParts:
    """The callers' database pool (`db`) and the running sessions' own (`upkeep_db`: what
    they write, so callers that exhaust `db` cannot fail a running session), the one
    Capacity, the reads, the telemetry hook, and the outbox of the webhooks that sessions'
    ends and requests to their callers owe (None: no webhooks)."""

    db: async_sessionmaker[DbSession]
    upkeep_db: async_sessionmaker[DbSession]
    capacity: Capacity
    queries: SessionQueries
    observer: SessionObserver
    webhooks: WebhookOutbox | None = None

    @classmethod
    def open(
        cls,
        db: async_sessionmaker[DbSession],
        max_sessions: int,
        *,
        upkeep_db: async_sessionmaker[DbSession] | None = None,
        observer: SessionObserver | None = None,
        webhooks: WebhookOutbox | None = None,
        on_full: Callable[[bool], None] | None = None,
    ) -> SessionParts:
        """The parts over a new Capacity of `max_sessions` (AGENTPLANE_MAX_SESSIONS), which
        tells `on_full` when it fills and frees (the admission health)."""
        capacity = Capacity(max_sessions, on_full=on_full or (lambda full: None))
        return cls(
            db,
            upkeep_db or db,
            capacity,
            SessionQueries(db, capacity),
            observer or NullObserver(),
            webhooks,
        )
