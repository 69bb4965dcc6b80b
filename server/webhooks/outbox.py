"""What a committed event owes to the tenant's receivers, written in the event's own
transaction: a session's end, its request to its caller, a day's spend past a threshold.

Which receivers get an event is decided here, from the tenants file in force: the
tenant's endpoints that want it and, for a session's own events, its callback URL. Each
delivery's body is rendered once, here, so every attempt sends the same bytes under the
same `webhook-id`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import InputRequest, Session, utcnow
from ..store.outbox import NewDelivery, insert_deliveries, session_window
from ..tenants import Tenant, TenantRegistry
from ..tenants.webhooks import (
    BUDGET_THRESHOLD,
    CALLBACK,
    CALLBACK_EVENTS,
    SESSION_ENDED,
    SESSION_PAUSED,
    SESSION_WAITING,
)

# An event's type and its data (domain JSON) -> the body's `data` (the proto's JSON mapping).
Renderer = Callable[[str, dict[str, Any]], dict[str, Any]]


def webhook_id() -> str:
    """A new delivery's id: the `webhook-id` of each of its attempts."""
    return f"msg_{uuid.uuid4().hex}"


def plain(event: str, data: dict[str, Any]) -> dict[str, Any]:
    """The renderer that leaves the data as it is (tests of the outbox alone)."""
    return data


class WebhookOutbox:
    """Writes the deliveries an event owes, in the caller's transaction."""

    def __init__(self, tenants: TenantRegistry, render: Renderer = plain) -> None:
        self._tenants = tenants
        self._render = render

    def _tenant(self, name: str) -> Tenant | None:
        tenant = self._tenants.tenants.get(name)
        return tenant if tenant is not None and tenant.webhooks.enabled else None

    def _deliveries(
        self,
        tenant: Tenant,
        event: str,
        data: dict[str, Any],
        *,
        at: datetime,
        session: Session | None = None,
        dedupe: str | None = None,
    ) -> list[NewDelivery]:
        policy = tenant.webhooks
        targets = [(e.name, e.url) for e in policy.wanting(event)]
        if (
            session is not None
            and session.callback_url
            and event in CALLBACK_EVENTS
            and policy.still_allows(CALLBACK, session.callback_url)
        ):
            targets.append((CALLBACK, session.callback_url))
        if not targets:
            return []
        body = json.dumps(
            {"type": event, "timestamp": at.isoformat(), "data": self._render(event, data)},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        deadline = at + timedelta(seconds=policy.retry_s)
        return [
            NewDelivery(
                id=webhook_id(),
                tenant=tenant.name,
                event=event,
                target=target,
                url=url,
                body=body,
                created_at=at,
                deadline=deadline,
                session_id=session.id if session is not None else None,
                dedupe_key=f"{tenant.name}/{target}/{dedupe}" if dedupe else None,
            )
            for target, url in targets
        ]

    async def session_ended(self, db: DbSession, final: Session) -> None:
        """`session.ended` with the final Session, in the transaction that records it."""
        tenant = self._tenant(final.tenant)
        if tenant is not None:
            deliveries = self._deliveries(
                tenant,
                SESSION_ENDED,
                {"session": final.to_json()},
                at=final.end_time or utcnow(),
                session=final,
            )
            await insert_deliveries(db, deliveries)

    async def session_waiting(self, db: DbSession, session: Session, request: InputRequest) -> None:
        """`session.waiting`: a running session asks its caller (in the request's
        transaction)."""
        tenant = self._tenant(session.tenant)
        if tenant is not None:
            data = {"session_id": session.id, "input_request": request.to_json()}
            deliveries = self._deliveries(
                tenant, SESSION_WAITING, data, at=request.created_at, session=session
            )
            await insert_deliveries(db, deliveries)

    async def session_paused(self, db: DbSession, session: Session) -> None:
        """`session.paused`: a running session paused at its budget (`session.paused` set),
        with the Session as it is then, in the pause's transaction."""
        tenant = self._tenant(session.tenant)
        if tenant is None or session.paused is None:
            return
        await insert_deliveries(
            db,
            self._deliveries(
                tenant,
                SESSION_PAUSED,
                {"session": session.to_json()},
                at=session.paused.since,
                session=session,
            ),
        )

    async def spend_settled(self, db: DbSession, tenant_name: str, session_id: str) -> None:
        """After a session's cost was added to its day (same transaction): `budget.threshold`
        if the day's spend reached the tenant's share of its limit, once per day and
        endpoint (a second crossing the same day, after a raised limit say, is dropped)."""
        tenant = self._tenant(tenant_name)
        if tenant is None or tenant.webhooks.budget_threshold is None:
            return
        share = Decimal(str(tenant.webhooks.budget_threshold))
        window = await session_window(db, session_id)
        if window is None or window.spent_usd < window.limit_usd * share:
            return
        data = {
            "tenant": tenant.name,
            "date": window.day,
            "time_zone": tenant.time_zone,
            "limit_usd": str(window.limit_usd),
            "spent_usd": str(window.spent_usd),
            "reserved_usd": str(window.reserved_usd),
            "threshold": str(share),
        }
        await insert_deliveries(
            db,
            self._deliveries(
                tenant,
                BUDGET_THRESHOLD,
                data,
                at=utcnow(),
                dedupe=f"{BUDGET_THRESHOLD}/{window.day}",
            ),
        )
