"""The operator's gauges (telemetry/gauges.py) wired to the parts of a server they read:
its capacity and warm pool, the tenants' budgets, the database pools and its health."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from sqlalchemy.ext.asyncio import AsyncEngine

from .domain import BudgetWindow, utcnow
from .health import Health
from .money.ledger import BudgetReader
from .sessions.agents.pool import WarmPool
from .sessions.capacity import Capacity
from .store.notify import BUDGET_CHANNEL, Bus
from .telemetry.budget_watch import BudgetWatch
from .telemetry.gauges import Occupancy, ServerGauges, Sources
from .telemetry.metrics import METER_NAME
from .telemetry.setup import Telemetry
from .tenants import TenantRegistry


def _windows_today(
    tenants: TenantRegistry, budgets: BudgetReader
) -> Callable[[], Awaitable[list[BudgetWindow]]]:
    async def read() -> list[BudgetWindow]:
        now = utcnow()
        return [
            await budgets.window(tenant, budgets.today(tenant, now))
            for tenant in list(tenants.tenants.values())
        ]

    return read


def watch_server(
    telemetry: Telemetry,
    *,
    tenants: TenantRegistry,
    capacity: Capacity,
    pool: WarmPool,
    budgets: BudgetReader,
    bus: Bus,
    engines: Mapping[str, AsyncEngine],
    health: Health,
) -> BudgetWatch:
    """Register the gauges; returns the budget watch they read (the caller runs it)."""
    watch = BudgetWatch(_windows_today(tenants, budgets))
    bus.subscribe(BUDGET_CHANNEL, watch.changed)
    bus.on_resume(watch.changed)

    def occupancy() -> Occupancy:
        return Occupancy(
            limit=capacity.limit,
            admitting=capacity.admitting,
            warm_agents=capacity.pooled,
            sessions=capacity.sessions(),
            warm_idle=pool.idle(),
        )

    ServerGauges(
        telemetry.instruments(METER_NAME),
        Sources(
            tenants=lambda: list(tenants.tenants),
            occupancy=occupancy,
            budgets=lambda: watch.windows,
            pools=engines,
            readiness=health.dependencies,
        ),
    )
    return watch
