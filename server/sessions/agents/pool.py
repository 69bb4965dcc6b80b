"""The warm pool: agent CLIs started and connected ahead of demand, per tenant.

A CLI's options are fixed when it starts (system prompt, tools, model, turn and budget
limits, env, cwd), so each tenant's pool holds agents for one option set: the tenant's
defaults with `warm_pool_model`. A RunSession that matches it takes a ready agent and
skips the CLI's start-up; any other starts cold. Each agent is made for the session id
that takes it (its folder and meter are that session's), serves that one session and is
then closed like any other; it is never handed out twice. The pool refills in the
background while the server has room (its session limit, counting pooled agents, and
free memory), replaces agents older than `max_age_s`, and is emptied on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal

from claude_agent_sdk import ClaudeSDKClient

from ...gateway.meter import SessionMeter
from ...sandbox.cli_env import SessionDirs
from ...sandbox.owners import write_marker
from ...tenants import Tenant
from ..capacity import Capacity
from ..run_request import RunRequest, SessionSpec, validate
from .launcher import Launcher

log = logging.getLogger(__name__)

# After a failed start, wait this long (doubling up to the maximum) before the next try.
RETRY_DELAY_S = 1.0
MAX_RETRY_DELAY_S = 60.0


# Marks the folder of a warm agent no session has taken yet; holds the server's pid.
WARM_MARKER = ".warm"

PoolKey = tuple[tuple[str, ...], str, int, Decimal, tuple[bool, str, int, str]]


def pool_key(spec: SessionSpec) -> PoolKey | None:
    """What a CLI's options depend on at spawn, for matching a request to a warm agent
    (None: the request resumes a conversation, has its caller in the loop, an output
    schema or input files: all are fixed at spawn too; or it pauses at its budget: a warm
    CLI checks a budget of its own)."""
    if (
        spec.resume_session_id
        or spec.in_the_loop
        or spec.output_schema
        or spec.input_files
        or spec.pauses
    ):
        return None
    return (spec.tools, spec.model, spec.max_turns, spec.budget_usd, spec.knobs)


@dataclass
class WarmAgent:
    """A CLI started and connected ahead of demand, for the session that will take its id.

    Its folder and meter are those of session `session_id`, so a taken agent is, from the
    first query on, exactly what a cold start of that session would have spawned.
    """

    session_id: str
    tenant: str
    key: PoolKey
    dirs: SessionDirs
    client: ClaudeSDKClient
    meter: SessionMeter
    born: float
    # The tenant's policy it was started with: a reload that changes it retires the agent.
    policy: Tenant | None = None

    def alive(self) -> bool:
        """Whether its CLI process still runs."""
        process = getattr(getattr(self.client, "_transport", None), "_process", None)
        return process is not None and process.returncode is None

    def fits(self, session_id: str, spec: SessionSpec) -> bool:
        """Whether it was made for this session and these options."""
        return self.session_id == session_id and self.key == pool_key(spec)

    def unmark(self) -> None:
        """Its folder now belongs to a session, no longer to the pool."""
        (self.dirs.root / WARM_MARKER).unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[ClaudeSDKClient]:
        """Its client, as `async with ClaudeSDKClient(...)` gives a new one."""
        try:
            yield self.client
        finally:
            await self.client.disconnect()


@dataclass(frozen=True)
class PoolConfig:
    """How the pool refills: agents older than `max_age_s` are replaced; no agent starts
    while the machine has less than `min_available_mib` of available memory."""

    max_age_s: float = 600.0
    min_available_mib: int = 1024
    # How long a closing agent gets to disconnect before its processes are killed.
    disconnect_timeout_s: float = 5.0


@dataclass
class PoolStats:
    """Counts since start, per tenant: takes served warm, takes that started cold, agents
    started, and agents closed unused (expired, dead, or at shutdown)."""

    hits: int = 0
    misses: int = 0
    started: int = 0
    discarded: int = 0


class WarmPool:
    """Ready agents per tenant; `take` hands one out, the refill loop keeps them stocked."""

    def __init__(
        self,
        launcher: Launcher,
        tenants: Iterable[Tenant],
        capacity: Capacity,
        *,
        config: PoolConfig | None = None,
        on_served: Callable[[str, bool], None] = lambda tenant, hit: None,
    ) -> None:
        """Pooled agents hold places in `capacity` (waiting, starting and closing ones).
        `on_served(tenant, hit)` is told of every admitted session of a tenant with a pool
        (the metrics)."""
        self._launcher = launcher
        self._capacity = capacity
        self.config = config or PoolConfig()
        self._on_served = on_served
        self._wanted = _wanted(tenants)
        self._ready: dict[str, deque[WarmAgent]] = {name: deque() for name in self._wanted}
        self.stats: dict[str, PoolStats] = {name: PoolStats() for name in self._wanted}
        self._starting = 0
        self._wake = asyncio.Event()
        capacity.wake_on_free(self._wake)
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._wanted)

    def ready(self, tenant: str) -> int:
        """How many agents of `tenant` wait in the pool."""
        return len(self._ready.get(tenant, ()))

    def idle(self) -> dict[str, int]:
        """How many agents wait in the pool, by tenant."""
        return {name: len(queue) for name, queue in list(self._ready.items())}

    @property
    def size(self) -> int:
        """Agents pooled or starting, all tenants."""
        return sum(len(q) for q in self._ready.values()) + self._starting

    def update(self, tenants: Iterable[Tenant]) -> None:
        """Follow a reloaded tenants file: agents started under a policy that changed or
        whose tenant is gone are closed (so no session admitted after the reload gets an
        agent with the old system prompt, tools or limits); new pools fill from now on."""
        wanted = _wanted(tenants)
        for name, (tenant, _) in self._wanted.items():
            if name not in wanted or wanted[name][0] != tenant:
                queue = self._ready.pop(name, deque())
                while queue:
                    self._discard(queue.popleft())
        for name in wanted:
            self._ready.setdefault(name, deque())
            self.stats.setdefault(name, PoolStats())
        self._wanted = wanted
        self._wake.set()

    def _current(self, agent: WarmAgent) -> bool:
        """Whether the agent was started under its tenant's policy as configured now."""
        wanted = self._wanted.get(agent.tenant)
        return wanted is not None and wanted[0] == agent.policy

    # -- handing out ---------------------------------------------------------------------

    def take(self, tenant: Tenant, spec: SessionSpec) -> WarmAgent | None:
        """A ready agent for a request of `tenant`, or None (the session starts cold).

        The agent leaves the pool here, so no other take can get it; its place in the
        capacity goes with it to the admission. The caller gives it back (`give_back`) if
        the session is not admitted after all, and reports each admitted session
        (`served`): hits and misses count admitted sessions only.
        """
        wanted = self._wanted.get(tenant.name)
        if wanted is None or wanted[0] != tenant:  # (a policy a reload replaced meanwhile)
            return None
        key = pool_key(spec)
        queue = self._ready[tenant.name]
        found = None
        if key is not None and key == pool_key(wanted[1]):
            while queue and found is None:
                agent = queue.popleft()
                if agent.alive() and not self._expired(agent):
                    found = agent
                else:
                    self._discard(agent)
        self._wake.set()
        return found

    def served(self, tenant: str, hit: bool) -> None:
        """Count an admitted session of `tenant`: served by a warm agent (hit) or cold."""
        stats = self.stats.get(tenant)
        if stats is None:
            return
        if hit:
            stats.hits += 1
        else:
            stats.misses += 1
        self._on_served(tenant, hit)

    def give_back(self, agent: WarmAgent) -> None:
        """Return an agent taken for a session that was then not admitted (never used)."""
        queue = self._ready.get(agent.tenant)
        if self._closed or queue is None or not agent.alive() or not self._current(agent):
            self._discard(agent)
        else:
            queue.appendleft(agent)

    async def discard(self, agent: WarmAgent) -> None:
        """Stop an agent no session will use, and remove its folder."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.client.disconnect(), self.config.disconnect_timeout_s)
        await self._launcher.release(agent.session_id, agent.dirs)

    # -- refilling -----------------------------------------------------------------------

    def start(self) -> None:
        """Start refilling in the background (until `close`)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self.run(), name="warm-pool")

    async def run(self) -> None:
        """Keep each tenant's pool stocked until `close`."""
        delay = RETRY_DELAY_S
        while not self._closed:
            self._wake.clear()
            self._expire()
            tenant = self._next_to_fill()
            if tenant is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.max_age_s / 4)
                continue
            if await self._start_one(*self._wanted[tenant]):
                delay = RETRY_DELAY_S
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)

    def _next_to_fill(self) -> str | None:
        """The tenant whose pool is emptiest relative to its size, if one needs an agent
        and the server has room and memory for it."""
        if not self._wanted or self._capacity.room <= 0:
            return None
        if _available_mib() < self.config.min_available_mib:
            return None
        short = [
            (len(self._ready[name]) / tenant.warm_pool_size, name)
            for name, (tenant, _) in self._wanted.items()
            if len(self._ready[name]) < tenant.warm_pool_size
        ]
        return min(short)[1] if short else None

    async def _start_one(self, tenant: Tenant, spec: SessionSpec) -> bool:
        if not self._capacity.claim_pooled():
            return True  # filled up meanwhile: the next round waits for room
        self._starting += 1
        try:
            agent = await self._prestart(tenant, spec)
        except Exception as exc:  # noqa: BLE001  # whatever stops a start: try again later
            self._capacity.release_pooled()
            log.warning(
                "warm_pool_start_failed", extra={"tenant": tenant.name, "detail": str(exc)[:500]}
            )
            return False
        except BaseException:
            self._capacity.release_pooled()
            raise
        finally:
            self._starting -= 1
        self.stats[tenant.name].started += 1
        if self._closed or not self._current(agent):
            self._discard(agent)  # a reload changed or removed the tenant while it started
        else:
            self._ready[tenant.name].append(agent)
        return True

    async def _prestart(self, tenant: Tenant, spec: SessionSpec) -> WarmAgent:
        """Start and connect a CLI with the options `spec` gives, for a session to come.

        Its meter has no budget until a session takes it, so the agent cannot spend
        anything while it waits.
        """
        key = pool_key(spec)
        if key is None:
            raise ValueError("a warm agent cannot resume a conversation")
        session_id = str(uuid.uuid4())
        dirs = self._launcher.folders.dirs(tenant.name, session_id)
        meter = self._launcher.open_meter(session_id, tenant, Decimal(0), spec)
        try:
            await self._launcher.folders.prepare(dirs, tenant)
            write_marker(dirs.root / WARM_MARKER)
            client = ClaudeSDKClient(
                self._launcher.options(
                    spec,
                    tenant,
                    dirs,
                    meter,
                    resume=None,
                    budget=spec.budget_usd,
                    max_turns=spec.max_turns,
                )
            )
            await client.connect()
        except BaseException:
            await self._launcher.release(session_id, dirs)
            raise
        born = asyncio.get_running_loop().time()
        return WarmAgent(session_id, tenant.name, key, dirs, client, meter, born, tenant)

    def _expired(self, agent: WarmAgent) -> bool:
        return asyncio.get_running_loop().time() - agent.born > self.config.max_age_s

    def _expire(self) -> None:
        for queue in self._ready.values():
            for agent in [a for a in queue if self._expired(a) or not a.alive()]:
                queue.remove(agent)
                self._discard(agent)

    def _discard(self, agent: WarmAgent) -> None:
        """Close a pooled agent in the background; its place is free once it is gone."""
        self.stats[agent.tenant].discarded += 1
        task = asyncio.get_running_loop().create_task(self._close(agent))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, agent: WarmAgent) -> None:
        try:
            await self.discard(agent)
        finally:
            self._capacity.release_pooled()

    # -- stopping and recovery -----------------------------------------------------------

    async def close(self) -> None:
        """Stop refilling (an agent still starting is stopped) and close every pooled
        agent, at shutdown; idempotent."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for queue in self._ready.values():
            while queue:
                self._discard(queue.popleft())
        await asyncio.gather(*self._closing, return_exceptions=True)


def _wanted(tenants: Iterable[Tenant]) -> dict[str, tuple[Tenant, SessionSpec]]:
    """Per tenant with a pool: its policy and the request its agents are started for."""
    return {
        t.name: (t, validate(RunRequest(prompt="(warm)", model=t.warm_pool_model), t))
        for t in tenants
        if t.warm_pool_size > 0
    }


def _available_mib() -> int:
    """MemAvailable from /proc/meminfo (a large number where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1 << 30
