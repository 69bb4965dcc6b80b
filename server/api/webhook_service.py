"""agentplane.v1.WebhookService, and the webhooks' bodies in the protos' JSON mapping."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import grpc
from agentplane.v1 import budget_pb2, webhook_pb2, webhook_pb2_grpc
from google.protobuf.json_format import MessageToDict

from ..domain import InputRequest, Session
from ..errors import InvalidArgument
from ..money.windows import window_bounds
from ..store.outbox import Delivery
from ..tenants import TenantRegistry
from ..tenants.webhooks import BUDGET_THRESHOLD, SESSION_ENDED, SESSION_PAUSED, SESSION_WAITING
from ..webhooks.listing import DeliveryReader, check_filter
from . import convert
from .auth import caller
from .errors import unary


def render(event: str, data: dict[str, Any]) -> dict[str, Any]:
    """A webhook's `data`: session.ended carries the final Session, session.waiting the
    InputRequest, budget.threshold the day's Budget (and the share it reached), each in
    the protos' JSON mapping (lowerCamelCase names, enums by name); session.paused the
    paused Session (its `paused` says why and until when)."""
    if event in (SESSION_ENDED, SESSION_PAUSED):
        session = convert.session_to_proto(Session.from_json(data["session"]))
        return {"session": MessageToDict(session)}
    if event == SESSION_WAITING:
        request = InputRequest.from_json(data["session_id"], data["input_request"])
        return {
            "sessionId": data["session_id"],
            "inputRequest": MessageToDict(convert.input_request_to_proto(request)),
        }
    if event == BUDGET_THRESHOLD:
        start, end = window_bounds(date.fromisoformat(data["date"]), data["time_zone"])
        limit, spent, reserved = (
            Decimal(data[k]) for k in ("limit_usd", "spent_usd", "reserved_usd")
        )
        budget = budget_pb2.Budget(
            tenant=data["tenant"],
            date=data["date"],
            time_zone=data["time_zone"],
            window_start=convert.timestamp(start),
            window_end=convert.timestamp(end),
            limit_usd=convert.money(limit),
            spent_usd=convert.money(spent),
            reserved_usd=convert.money(reserved),
            remaining_usd=convert.money(max(limit - spent - reserved, Decimal(0))),
        )
        return {"budget": MessageToDict(budget), "threshold": data["threshold"]}
    raise ValueError(f"no rendering for event {event!r}")


_STATES = {
    webhook_pb2.DELIVERY_STATE_PENDING: "PENDING",
    webhook_pb2.DELIVERY_STATE_DELIVERED: "DELIVERED",
    webhook_pb2.DELIVERY_STATE_FAILED: "FAILED",
}


def delivery_to_proto(d: Delivery) -> webhook_pb2.WebhookDelivery:
    by_name = {name: value for value, name in _STATES.items()}
    return webhook_pb2.WebhookDelivery(
        id=d.id,
        event=d.event,
        endpoint=d.target,
        url=d.url,
        session_id=d.session_id or "",
        state=by_name[d.state],
        create_time=convert.timestamp(d.created_at),
        next_attempt_time=convert.timestamp(d.next_attempt_at if d.state == "PENDING" else None),
        deadline=convert.timestamp(d.deadline),
        end_time=convert.timestamp(d.ended_at),
        attempts=[
            webhook_pb2.WebhookAttempt(
                number=a.number,
                start_time=convert.timestamp(a.started_at),
                duration_ms=a.duration_ms,
                http_status=a.status or 0,
                error=a.error,
            )
            for a in d.history
        ],
    )


class WebhookService(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, tenants: TenantRegistry, deliveries: DeliveryReader) -> None:
        self._tenants = tenants
        self._deliveries = deliveries

    @unary
    async def ListWebhookDeliveries(
        self,
        request: webhook_pb2.ListWebhookDeliveriesRequest,
        context: grpc.aio.ServicerContext,
    ) -> webhook_pb2.ListWebhookDeliveriesResponse:
        tenant = caller(self._tenants, context)
        if request.state and request.state not in _STATES:
            raise InvalidArgument("state", f"{request.state} is not a DeliveryState")
        flt = check_filter(
            request.session_id.strip(), _STATES.get(request.state, ""), request.event.strip()
        )
        page, token = await self._deliveries.list(
            tenant, flt, page_size=request.page_size, page_token=request.page_token
        )
        return webhook_pb2.ListWebhookDeliveriesResponse(
            deliveries=[delivery_to_proto(d) for d in page], next_page_token=token
        )
