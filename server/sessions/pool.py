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
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InvalidArgument
from ..tenants import Tenant
from .requests import RunRequest, SessionSpec, validate
from .runner import WARM_MARKER, AgentRunner, WarmAgent, pool_key

log = logging.getLogger(__name__)

# After a failed start, wait this long (doubling up to the maximum) before the next try.
RETRY_DELAY_S = 1.0
MAX_RETRY_DELAY_S = 60.0


@dataclass(frozen=True)
class PoolConfig:
    """How the pool refills: agents older than `max_age_s` are replaced; no agent starts
    while the machine has less than `min_available_mib` of available memory."""

    max_age_s: float = 600.0
    min_available_mib: int = 1024


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
        runner: AgentRunner,
        tenants: Iterable[Tenant],
        *,
        room: Callable[[], int],
        config: PoolConfig | None = None,
        on_served: Callable[[str, bool], None] = lambda tenant, hit: None,
    ) -> None:
        """`room()` is how many more sessions the server could run now; pooled agents
        count against it. `on_served(tenant, hit)` is told of every admitted session of a
        tenant with a pool (the metrics)."""
        self._runner = runner
        self._room = room
        self.config = config or PoolConfig()
        self._on_served = on_served
        self._wanted: dict[str, tuple[Tenant, SessionSpec]] = {
            t.name: (t, validate(RunRequest(prompt="(warm)", model=t.warm_pool_model), t))
            for t in tenants
            if t.warm_pool_size > 0
        }
        self._ready: dict[str, deque[WarmAgent]] = {name: deque() for name in self._wanted}
        self.stats: dict[str, PoolStats] = {name: PoolStats() for name in self._wanted}
        self._starting = 0
        self._wake = asyncio.Event()
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._wanted)

    def ready(self, tenant: str) -> int:
        """How many agents of `tenant` wait in the pool."""
        return len(self._ready.get(tenant, ()))

    @property
    def size(self) -> int:
        """Agents pooled or starting, all tenants."""
        return sum(len(q) for q in self._ready.values()) + self._starting

    def check_models(self) -> None:
        """Raise ConfigError if a tenant's warm_pool_model is not in the price table."""
        for name, (_, spec) in self._wanted.items():
            try:
                self._runner.check_model(spec.model)
            except InvalidArgument as exc:
                raise ConfigError(f"tenants.{name}.warm_pool_model", str(exc)) from None

    # -- handing out ---------------------------------------------------------------------

    def take(self, tenant: Tenant, spec: SessionSpec) -> WarmAgent | None:
        """A ready agent for a request of `tenant`, or None (the session starts cold).

        The agent leaves the pool here, so no other take can get it; the caller gives it
        back (`give_back`) if the session is not admitted after all, and reports each
        admitted session (`served`): hits and misses count admitted sessions only.
        """
        wanted = self._wanted.get(tenant.name)
        if wanted is None:
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
        if self._closed or queue is None or not agent.alive():
            self._discard(agent)
        else:
            queue.appendleft(agent)

    # -- refilling -----------------------------------------------------------------------

    def start(self) -> None:
        """Start refilling in the background (until `close`)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self.run(), name="warm-pool")

    async def run(self) -> None:
        """Keep each tenant's pool stocked until `close`."""
        await self.sweep()
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
        if self._room() - self.size <= 0 or _available_mib() < self.config.min_available_mib:
            return None
        short = [
            (len(self._ready[name]) / tenant.warm_pool_size, name)
            for name, (tenant, _) in self._wanted.items()
            if len(self._ready[name]) < tenant.warm_pool_size
        ]
        return min(short)[1] if short else None

    async def _start_one(self, tenant: Tenant, spec: SessionSpec) -> bool:
        self._starting += 1
        try:
            agent = await self._runner.prestart(tenant, spec)
        except Exception as exc:  # noqa: BLE001  # whatever stops a start: try again later
            log.warning("warm_pool_start_failed",
                        extra={"tenant": tenant.name, "detail": str(exc)[:500]})
            return False
        finally:
            self._starting -= 1
        self.stats[tenant.name].started += 1
        self._ready[tenant.name].append(agent)
        return True

    def _expired(self, agent: WarmAgent) -> bool:
        return asyncio.get_running_loop().time() - agent.born > self.config.max_age_s

    def _expire(self) -> None:
        for queue in self._ready.values():
            for agent in [a for a in queue if self._expired(a) or not a.alive()]:
                queue.remove(agent)
                self._discard(agent)

    def _discard(self, agent: WarmAgent) -> None:
        self.stats[agent.tenant].discarded += 1
        task = asyncio.get_running_loop().create_task(self._runner.discard(agent))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

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

    async def sweep(self) -> int:
        """Remove warm agents a server that died left in the work dir (their processes
        too); returns how many. Agents of live servers sharing the dir are left alone."""
        orphans = await asyncio.to_thread(lambda: [
            marker.parent
            for marker in self._runner.config.work_dir.glob(f"*/*/{WARM_MARKER}")
            if not _owner_alive(marker)
        ])
        for root in orphans:
            await self._runner.remove_folder(root)
        if orphans:
            log.info("warm_pool_swept", extra={"agents": len(orphans)})
        return len(orphans)


def _owner_alive(marker: Path) -> bool:
    try:
        pid = int(marker.read_text().strip())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
