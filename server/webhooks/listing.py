"""ListWebhookDeliveries: a tenant's deliveries with their attempts, newest first, in
pages whose opaque tokens are bound to the filters they were issued for."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ..errors import InvalidArgument, quote
from ..store import outbox as repo
from ..store.outbox import Delivery, DeliveryFilter
from ..tenants import Tenant
from ..tenants.webhooks import EVENTS

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def _digest(flt: DeliveryFilter) -> str:
    body = json.dumps([flt.session_id, flt.state, flt.event])
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def encode_token(last: Delivery, flt: DeliveryFilter) -> str:
    body = json.dumps({"c": last.created_at.isoformat(), "i": last.id, "f": _digest(flt)})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_token(token: str, flt: DeliveryFilter) -> tuple[datetime, str]:
    """The position a token stands for; InvalidArgument on `page_token` otherwise."""
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        created, delivery_id, digest = datetime.fromisoformat(body["c"]), body["i"], body["f"]
        if created.utcoffset() != timedelta(0) or not isinstance(delivery_id, str):
            raise ValueError(token)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
    if digest != _digest(flt):
        raise InvalidArgument("page_token", "was issued for different filters")
    return created, delivery_id


def check_filter(session_id: str, state: str, event: str) -> DeliveryFilter:
    """The filters of a request (InvalidArgument naming a bad one)."""
    if event and event not in EVENTS:
        raise InvalidArgument("event", f"{quote(event)} is not one of {', '.join(EVENTS)}")
    if state and state not in repo.STATES:
        raise InvalidArgument("state", f"{quote(state)} is not a delivery state")
    if len(session_id) > 64 or "\0" in session_id:
        raise InvalidArgument("session_id", f"{quote(session_id)} is not a session id")
    return DeliveryFilter(session_id=session_id, state=state, event=event)


class DeliveryReader:
    """Reads a tenant's deliveries."""

    def __init__(self, db: async_sessionmaker[DbSession]) -> None:
        self._db = db

    async def list(
        self, tenant: Tenant, flt: DeliveryFilter, *, page_size: int, page_token: str
    ) -> tuple[list[Delivery], str]:
        """A page of deliveries and the token of the next one ("" at the end)."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must be >= 0, not {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_token(page_token, flt) if page_token else None
        async with self._db() as db:
            found = await repo.list_deliveries(db, tenant.name, flt, after=after, limit=size + 1)
        page = found[:size]
        return page, encode_token(page[-1], flt) if len(found) > size else ""
