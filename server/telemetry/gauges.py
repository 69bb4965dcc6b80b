"""The gauges an operator watches, read from the server's state at each collection:
capacity and what holds it, sessions by state, idle warm agents, each tenant's budget
today, the database pools and readiness per dependency.

Every gauge reports every label value it knows of, zeros included (each tenant, each
state, each dependency), so that an alert on a value, or on its absence, sees it from
the start. Callbacks run on the exporter's thread: they only read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy.ext.asyncio import AsyncEngine

from ..domain import BudgetWindow, SessionState
from .instruments import Instruments

CAPACITY_LIMIT = "agentplane.capacity.limit"
CAPACITY_USED = "agentplane.capacity.used"
SESSIONS_LIVE = "agentplane.sessions.live"
WARM_AGENTS_IDLE = "agentplane.warm_pool.idle"
BUDGET_LIMIT = "agentplane.budget.limit_usd"
BUDGET_SPENT = "agentplane.budget.spent_usd"
BUDGET_RESERVED = "agentplane.budget.reserved_usd"
BUDGET_REMAINING = "agentplane.budget.remaining_usd"
READY = "agentplane.ready"
# The database client conventions' pool metrics.
DB_CONNECTIONS = "db.client.connection.count"
DB_CONNECTIONS_MAX = "db.client.connection.max"
DB_POOL_NAME = "db.client.connection.pool.name"
DB_CONNECTION_STATE = "db.client.connection.state"

# What holds one of the server's places (AGENTPLANE_MAX_SESSIONS).
HOLDERS = ("session", "admitting", "warm_agent")
# A live session's state: admitted, its agent not running yet; running; running but
# waiting for its caller (a tool call, an approval, an answer).
STARTING, RUNNING, AWAITING_CALLER = "starting", "running", "awaiting_caller"
LIVE_STATES = (STARTING, RUNNING, AWAITING_CALLER)


@dataclass(frozen=True)
class Occupancy:
    """What holds the server's places at one moment."""

    limit: int
    admitting: int
    # Places of the warm pool: its idle agents, and those starting or being closed.
    warm_agents: int
    # Each live session's tenant, state and whether it waits for its caller.
    sessions: Sequence[tuple[str, SessionState, bool]]
    # Idle warm agents by tenant.
    warm_idle: Mapping[str, int]


@dataclass(frozen=True)
class Sources:
    """Where the gauges read the server's state."""

    tenants: Callable[[], Iterable[str]]
    occupancy: Callable[[], Occupancy]
    # Today's budget window of each tenant, as last read (see BudgetWatch).
    budgets: Callable[[], Mapping[str, BudgetWindow]]
    # The database engines by pool name.
    pools: Mapping[str, AsyncEngine]
    # Whether each dependency is fine (`server`: ready for work, all of them considered).
    readiness: Callable[[], Mapping[str, bool]]


def _state(state: SessionState, awaiting: bool) -> str:
    if state is SessionState.IDLE:
        return STARTING
    return AWAITING_CALLER if awaiting else RUNNING


class ServerGauges:
    """Registers the gauges on `instruments`, reading `sources` at each collection."""

    def __init__(self, instruments: Instruments, sources: Sources) -> None:
        self._sources = sources
        gauge = instruments.gauge
        gauge(
            CAPACITY_LIMIT,
            "{agent}",
            "Agents this server may hold at once (AGENTPLANE_MAX_SESSIONS)",
            self._limit,
        )
        gauge(
            CAPACITY_USED,
            "{agent}",
            "Agents this server holds, by holder: a live session, an admission, the warm pool",
            self._used,
        )
        gauge(
            SESSIONS_LIVE,
            "{session}",
            "Live sessions of this server by tenant and state (starting, running, awaiting_caller)",
            self._sessions,
        )
        gauge(WARM_AGENTS_IDLE, "{agent}", "Idle warm agents, by tenant", self._warm_idle)
        for name, description, value in (
            (BUDGET_LIMIT, "Daily budget of each tenant", "limit_usd"),
            (BUDGET_SPENT, "Spent today (settled sessions), by tenant", "spent_usd"),
            (BUDGET_RESERVED, "Held today by running sessions, by tenant", "reserved_usd"),
            (BUDGET_REMAINING, "Left today for new sessions, by tenant", "remaining_usd"),
        ):
            gauge(name, "{USD}", description, self._budget(attrgetter(value)))
        gauge(
            READY,
            "1",
            "1 while a dependency is fine, by dependency (server: ready for new sessions)",
            self._ready,
        )
        instruments.observed_up_down_counter(
            DB_CONNECTIONS,
            "{connection}",
            "Database connections by pool and state (used, idle)",
            self._connections,
        )
        instruments.observed_up_down_counter(
            DB_CONNECTIONS_MAX,
            "{connection}",
            "Most database connections each pool opens",
            self._connections_max,
        )

    def _limit(self, _options: CallbackOptions) -> Iterator[Observation]:
        yield Observation(self._sources.occupancy().limit)

    def _used(self, _options: CallbackOptions) -> Iterator[Observation]:
        now = self._sources.occupancy()
        counts = (len(now.sessions), now.admitting, now.warm_agents)
        for holder, count in zip(HOLDERS, counts, strict=True):
            yield Observation(count, {"holder": holder})

    def _sessions(self, _options: CallbackOptions) -> Iterator[Observation]:
        counts = dict.fromkeys(((t, s) for t in self._sources.tenants() for s in LIVE_STATES), 0)
        for tenant, state, awaiting in self._sources.occupancy().sessions:
            key = (tenant, _state(state, awaiting))
            counts[key] = counts.get(key, 0) + 1
        for (tenant, name), count in counts.items():
            yield Observation(count, {"tenant": tenant, "state": name})

    def _warm_idle(self, _options: CallbackOptions) -> Iterator[Observation]:
        idle = self._sources.occupancy().warm_idle
        for tenant in self._sources.tenants():
            yield Observation(idle.get(tenant, 0), {"tenant": tenant})

    def _budget(
        self, value: Callable[[BudgetWindow], Any]
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        def observe(_options: CallbackOptions) -> Iterator[Observation]:
            for tenant, window in self._sources.budgets().items():
                yield Observation(float(value(window)), {"tenant": tenant})

        return observe

    def _ready(self, _options: CallbackOptions) -> Iterator[Observation]:
        for dependency, fine in self._sources.readiness().items():
            yield Observation(int(fine), {"dependency": dependency})

    def _connections(self, _options: CallbackOptions) -> Iterator[Observation]:
        for name, engine in self._sources.pools.items():
            pool: Any = engine.pool
            if not hasattr(pool, "checkedout"):  # a pool that does not count (SQLite :memory:)
                continue
            yield Observation(pool.checkedout(), {DB_POOL_NAME: name, DB_CONNECTION_STATE: "used"})
            yield Observation(pool.checkedin(), {DB_POOL_NAME: name, DB_CONNECTION_STATE: "idle"})

    def _connections_max(self, _options: CallbackOptions) -> Iterator[Observation]:
        for name, engine in self._sources.pools.items():
            pool: Any = engine.pool
            if hasattr(pool, "size"):
                # SQLAlchemy has no public getter of the overflow allowed.
                yield Observation(
                    pool.size() + getattr(pool, "_max_overflow", 0), {DB_POOL_NAME: name}
                )
