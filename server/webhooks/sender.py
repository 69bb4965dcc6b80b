"""Sends the outbox's due deliveries, signed, from whichever replica claims them.

Each replica runs one sender. It claims a tenant's due deliveries only up to that
tenant's free slots (`webhooks.max_concurrent`), so a tenant whose receiver is slow or
dead fills its own slots, never another's; sends run in tasks of their own, off every
session's path. A claim lasts a lease (twice the timeout, and a second): a replica that
dies mid-send leaves its claim to expire, and another sends the delivery again under the
same `webhook-id` (at least once). Redirects are not followed; every attempt is recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker
from standardwebhooks import Webhook

from ..domain import utcnow
from ..errors import DatabaseUnavailable
from ..recurring import RecurringProblem
from ..store import outbox as repo
from ..store.engine import bus_of
from ..store.outages import cause
from ..tenants import TenantRegistry
from ..tenants.webhooks import SecretUnavailable, WebhookPolicy
from .metrics import WebhookMetrics

log = logging.getLogger(__name__)

USER_AGENT = "agentplane-webhooks"
PRUNE_INTERVAL_S = 3600.0


@dataclass(frozen=True)
class SenderConfig:
    """This replica's identity (as a claim names it) and how it sends."""

    owner: str
    timeout_s: float = 10.0
    # How often due deliveries are looked for besides when told (retries of other
    # replicas' deliveries, notifications missed).
    poll_s: float = 2.0
    # Deliveries in flight on this replica, all tenants together.
    max_in_flight: int = 64
    # Delivered and failed deliveries are listed this long, then deleted (checked hourly).
    keep_days: float = 30.0

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=2 * self.timeout_s + 1)


def retry_delay(policy: WebhookPolicy, attempts: int, rand: Callable[[], float]) -> float:
    """Seconds before the next attempt after `attempts` failed ones: the first retry delay
    doubled per retry, capped, times a random factor in [0.5, 1] (so that receivers
    coming back are not hit by every sender at once)."""
    base = min(policy.first_retry_s * 2 ** (attempts - 1), policy.max_retry_delay_s)
    return base * (0.5 + rand() / 2)


@dataclass(frozen=True)
class _Outcome:
    status: int | None
    error: str
    final: bool = False  # no retry can succeed (the receiver is no longer allowed)


class WebhookSender:
    """Claims and sends due deliveries until cancelled."""

    def __init__(
        self,
        db: async_sessionmaker[DbSession],
        tenants: TenantRegistry,
        config: SenderConfig,
        metrics: WebhookMetrics | None = None,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._db = db
        self._tenants = tenants
        self.config = config
        self._metrics = metrics
        self._rand = rand
        self._wake = asyncio.Event()
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {}
        self._http: aiohttp.ClientSession | None = None
        bus = bus_of(db)
        bus.subscribe(repo.WEBHOOKS_CHANNEL, lambda _: self._wake.set())
        bus.on_resume(self._wake.set)

    def wake(self) -> None:
        """Look for due deliveries now."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return sum(len(tasks) for tasks in self._in_flight.values())

    async def run(self) -> None:
        """Claim and send until cancelled; database outages are waited out. Cancelled,
        it stops its sends: their claims expire and they are sent again."""
        problem = RecurringProblem(log, "webhook sender: database unavailable")
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.config.max_in_flight),
            trust_env=False,  # never a proxy from the environment
            headers={"user-agent": USER_AGENT},
        )
        # Which replica a delivery's claim names (`claimed_by`): for operators and tests.
        log.info("webhook_sender_started", extra={"owner": self.config.owner})
        loop = asyncio.get_running_loop()
        prune_at = loop.time()
        try:
            while True:
                self._wake.clear()
                try:
                    await self._claim_due()
                    if loop.time() >= prune_at:
                        await self._prune()
                        prune_at = loop.time() + PRUNE_INTERVAL_S
                    problem.resolved()
                except (DBAPIError, DatabaseUnavailable) as exc:
                    problem.failed(cause(exc.__cause__ or exc))
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
                except TimeoutError:
                    pass
        finally:
            tasks = [t for tasks in self._in_flight.values() for t in tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._http.close()
            await self._release()

    async def _release(self) -> None:
        """Stopping: hand this replica's unsent claims back (best effort: else they
        expire with their lease)."""
        try:
            async with self._db.begin() as db:
                await repo.release(db, self.config.owner)
        except (DBAPIError, DatabaseUnavailable, OSError) as exc:
            log.warning("webhook_claims_kept", extra={"detail": cause(exc)})

    async def _prune(self) -> None:
        before = utcnow() - timedelta(days=self.config.keep_days)
        async with self._db.begin() as db:
            deleted = await repo.delete_ended(db, before)
        if deleted:
            log.info("webhook_deliveries_pruned", extra={"deleted": deleted})

    def _policy(self, tenant: str) -> WebhookPolicy | None:
        found = self._tenants.tenants.get(tenant)
        return found.webhooks if found is not None else None

    async def _claim_due(self) -> None:
        now = utcnow()
        async with self._db() as db:
            tenants = await repo.due_tenants(db, now)
        random.shuffle(tenants)  # no tenant always first in line for this replica's slots
        for tenant in tenants:
            policy = self._policy(tenant)
            slots = policy.max_concurrent if policy is not None else 1
            free = min(
                slots - len(self._in_flight.get(tenant, ())),
                self.config.max_in_flight - self.in_flight,
            )
            if free <= 0:
                continue
            async with self._db.begin() as db:
                claimed = await repo.claim(
                    db,
                    tenant=tenant,
                    owner=self.config.owner,
                    now=now,
                    until=now + self.config.lease,
                    limit=free,
                )
            for delivery in claimed:
                task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery.id}")
                tasks = self._in_flight.setdefault(tenant, set())
                tasks.add(task)
                task.add_done_callback(functools.partial(self._done, tenant))

    def _done(self, tenant: str, task: asyncio.Task[None]) -> None:
        tasks = self._in_flight.get(tenant)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._in_flight[tenant]
        self._wake.set()  # a slot is free: the tenant may have more due

    async def _deliver(self, delivery: repo.Delivery) -> None:
        policy = self._policy(delivery.tenant)
        started = utcnow()
        if delivery.attempts and started > delivery.deadline:
            # Its retry came due within the window but is sent after it (a busy replica):
            # no attempt starts past the deadline.
            await self._give_up(delivery, started)
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outcome = await self._send(delivery, policy)
        duration_ms = int((loop.time() - t0) * 1000)
        ended = utcnow()
        delivered = outcome.status is not None and 200 <= outcome.status < 300
        try:
            async with self._db.begin() as db:
                number = await repo.attempt_number(db, delivery.id)
                state, next_at, delay = repo.DELIVERED, ended, 0.0
                if not delivered:
                    delay = retry_delay(policy, number, self._rand) if policy else 0.0
                    next_at = ended + timedelta(seconds=delay)
                    state = (
                        repo.FAILED
                        if outcome.final or policy is None or next_at > delivery.deadline
                        else repo.PENDING
                    )
                await repo.record_attempt(
                    db,
                    delivery,
                    repo.Attempt(
                        number,
                        started,
                        duration_ms,
                        outcome.status,
                        outcome.error,
                        self.config.owner,
                    ),
                    state=state,
                    next_attempt_at=next_at,
                    ended_at=None if state == repo.PENDING else ended,
                )
        except (DBAPIError, DatabaseUnavailable, IntegrityError) as exc:
            # Its claim expires and it is sent again (same webhook-id): at least once.
            log.warning(
                "webhook_unrecorded",
                extra={"delivery_id": delivery.id, "tenant": delivery.tenant, "detail": cause(exc)},
            )
            return
        if state == repo.PENDING:
            loop.call_later(delay, self._wake.set)
        self._report(delivery, number, state, outcome, ended)

    async def _give_up(self, delivery: repo.Delivery, at: datetime) -> None:
        try:
            async with self._db.begin() as db:
                if not await repo.give_up(db, delivery, sender=self.config.owner, at=at):
                    return
        except (DBAPIError, DatabaseUnavailable) as exc:
            # Its claim expires; whoever claims it next gives it up.
            log.warning(
                "webhook_unrecorded",
                extra={"delivery_id": delivery.id, "tenant": delivery.tenant, "detail": cause(exc)},
            )
            return
        log.warning(
            "webhook_failed",
            extra={
                "delivery_id": delivery.id,
                "tenant": delivery.tenant,
                "event": delivery.event,
                "endpoint": delivery.target,
                "session_id": delivery.session_id,
                "attempt": delivery.attempts,
                "detail": "its retry window closed before it could be sent again",
            },
        )

    async def _send(self, delivery: repo.Delivery, policy: WebhookPolicy | None) -> _Outcome:
        if policy is None or not policy.still_allows(delivery.target, delivery.url):
            return _Outcome(None, "the receiver is no longer in the tenants file", final=True)
        secret = policy.secret_for(delivery.target)
        if secret is None:
            return _Outcome(None, "no signing secret is configured for it", final=True)
        try:
            signer = Webhook(secret.read())
        except SecretUnavailable as exc:
            return _Outcome(None, str(exc))
        now = datetime.now(UTC)
        body = delivery.body.encode()
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(delivery.id, now, body),
        }
        assert self._http is not None
        try:
            async with self._http.post(
                delivery.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if 300 <= status < 400:
                    where = response.headers.get("location", "")
                    return _Outcome(status, f"HTTP {status}: redirect to {where!r} not followed")
                if not 200 <= status < 300:
                    return _Outcome(status, f"HTTP {status}")
                return _Outcome(status, "")
        except TimeoutError:
            return _Outcome(None, f"timed out after {self.config.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            reason = (exc.os_error.strerror or str(exc.os_error)) if exc.os_error else str(exc)
            return _Outcome(None, f"cannot connect to {exc.host}:{exc.port}: {reason}")
        except aiohttp.ClientError as exc:
            return _Outcome(None, f"{type(exc).__name__}: {exc}"[:500])

    def _report(
        self,
        delivery: repo.Delivery,
        number: int,
        state: str,
        outcome: _Outcome,
        ended: datetime,
    ) -> None:
        extra = {
            "delivery_id": delivery.id,
            "tenant": delivery.tenant,
            "event": delivery.event,
            "endpoint": delivery.target,
            "session_id": delivery.session_id,
            "attempt": number,
            "status": outcome.status,
            "detail": outcome.error or None,
        }
        if state == repo.DELIVERED:
            log.info("webhook_delivered", extra=extra)
        elif state == repo.FAILED:
            log.warning("webhook_failed", extra=extra)
        else:
            log.info("webhook_retrying", extra=extra)
        if self._metrics is not None:
            self._metrics.attempted(delivery.tenant, delivery.event, state)
            if state == repo.DELIVERED:
                seconds = (ended - delivery.created_at).total_seconds()
                self._metrics.delivered(delivery.tenant, delivery.event, max(seconds, 0.0))
