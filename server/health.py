"""grpc.health.v1 statuses and the readiness checks behind them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # the public name of the asyncio servicer
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import DatabaseUnavailable, Unavailable
from .recurring import RecurringProblem
from .sandbox.cli_env import NO_OUTBOUND_TRAFFIC
from .store.diagnosis import explain
from .store.engine import migrate, migrations_current

log = logging.getLogger(__name__)

SESSION_SERVICE = "agentplane.v1.SessionService"
READINESS = "readiness"
LIVENESS = "liveness"
# SERVING while every session runs sandboxed; NOT_SERVING names the unsafe opt-out
# (AGENTPLANE_SANDBOX=none), which leaves the server itself serving.
SANDBOX = "agentplane.sandbox"
# NOT_SERVING from a model API request that could not connect (refused, no such host) to
# the next that got an answer: seen per replica without pulling each one's logs. Not a
# readiness input: another replica's network may reach the model API.
MODEL_API = "agentplane.model_api"
# NOT_SERVING while the tenants file on disk is invalid: the server keeps the last valid
# one (callers are still served by it) until the file is fixed. Not a readiness input.
TENANTS = "agentplane.tenants"
# The names that say "send me work": NOT_SERVING until ready, and again on shutdown.
READY_NAMES = ("", SESSION_SERVICE, READINESS)
# Readiness for new sessions: as READINESS, and NOT_SERVING too while the replica is full
# (no place for another agent, sessions/capacity.py). The client balances RunSession on
# it, so new sessions go to replicas with room; every other call (reads, cancels,
# answers) balances on READINESS, so a fleet that is full still serves them.
ADMISSION = "agentplane.admission"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Servicer(health_aio.HealthServicer):
    """grpcio's servicer, with `List` (which it leaves UNIMPLEMENTED)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: object
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


# The parts of readiness: a replica is ready when none of them has a problem.
STARTING = "starting"  # the start-up checks have not all finished
DATABASE = "database"  # the callers' pool reaches the database, whose schema is current
WRITES = "writes"  # the running sessions' own pool does (their events, leases, end)
LISTEN = "listen"  # the LISTEN connection is subscribed and hears what the pools notify
CLI = "cli"  # the agent CLI starts
_ORDER = (STARTING, DATABASE, WRITES, LISTEN, CLI)

_POOLS = {DATABASE: "the callers' pool", WRITES: "the running sessions' pool"}
UNREACHABLE = "the database is unreachable; retry later"
DEAF = (
    "this replica cannot hear the other replicas now (its LISTEN connection is down); retry later"
)


@dataclass(frozen=True)
class _Problem:
    message: str  # what a caller is told
    database: bool  # the caller gets DatabaseUnavailable (else Unavailable)


@dataclass(frozen=True)
class PoolCheck:
    """A pool readiness checks: always (each interval), or only while it is failing
    (found so by a caller's request or the start-up check)."""

    part: str
    engine: AsyncEngine
    always: bool = True


class Health:
    """Owns the health servicer and the reasons the server is not ready, if any."""

    def __init__(self) -> None:
        self.servicer = _Servicer()
        self._problems: dict[str, _Problem] = {STARTING: _Problem("starting up", False)}
        self._stopping = False
        self._model_api_reachable = True
        self._sandboxed = True
        self._tenants_valid = True
        self._full = False  # every place taken (sessions/capacity.py): ADMISSION only
        self._checked: set[str] = set()  # the parts checked at least once
        self._updates: set[asyncio.Task[None]] = set()
        self._details: dict[str, str] = {}  # each problem's words for the log
        # Each failing part's log: its cause once, then at growing intervals while it
        # lasts (a failing pool is re-checked, the LISTEN connection retried, every few
        # seconds), a new cause at once, and its end.
        self._logs: dict[str, RecurringProblem] = {}
        # Set the first time readiness is SERVING (`dev` then says what to type next).
        self.became_ready = asyncio.Event()

    async def init(self, *, sandboxed: bool = True, listens: bool = False) -> None:
        """`listens`: readiness waits for a LISTEN connection too (see `listen`)."""
        self._sandboxed = sandboxed
        if listens:
            self._problems[LISTEN] = _Problem(DEAF, True)
        for name in (*READY_NAMES, ADMISSION):
            await self.servicer.set(name, NOT_SERVING)
        await self.servicer.set(LIVENESS, SERVING)
        await self.servicer.set(SANDBOX, SERVING if sandboxed else NOT_SERVING)
        await self.servicer.set(MODEL_API, SERVING)
        await self.servicer.set(TENANTS, SERVING)

    @property
    def problem(self) -> str | None:
        """Why the server is not ready, for callers (None: it is)."""
        if self._stopping:
            return "the server is shutting down"
        first = self._first()
        return first.message if first is not None else None

    def _first(self) -> _Problem | None:
        return next((self._problems[p] for p in _ORDER if p in self._problems), None)

    def model_api(self, reachable: bool) -> None:
        """The metering gateway reached the model API, or could not connect to it."""
        if reachable == self._model_api_reachable:
            return
        self._model_api_reachable = reachable
        if not reachable:
            log.warning("model_api_unreachable")
        self._spawn(self.servicer.set(MODEL_API, SERVING if reachable else NOT_SERVING))

    async def tenants(self, valid: bool) -> None:
        """The tenants file on disk was read: valid (and applied), or not (ignored)."""
        self._tenants_valid = valid
        await self.servicer.set(TENANTS, SERVING if valid else NOT_SERVING)

    def full(self, full: bool) -> None:
        """The replica became full, or has room again: ADMISSION follows (fullness is no
        problem: readiness, the metrics' `server` dependency and refusals ignore it)."""
        self._full = full
        log.debug("replica_full" if full else "replica_has_room")
        self._spawn(self._publish())

    def listen(self, detail: str | None) -> None:
        """The LISTEN connection is subscribed and proven (None), or not: why (for the log)."""
        self._spawn(self._set(LISTEN, None if detail is None else _Problem(DEAF, True), detail))

    def pool_failed(self, part: str, engine: AsyncEngine, error: BaseException) -> None:
        """A request found the pool of `part` (`engine`'s) unable to connect (or lost a
        connection in use: the driver's `error`): not ready until a check of that pool
        passes again."""
        if part not in self._problems:
            detail = f"{_POOLS[part]}: {unreachable(error, engine.url)}"
            self._spawn(self._pool_failed(part, detail))

    async def _pool_failed(self, part: str, detail: str) -> None:
        if part not in self._problems:  # a check may have found it (in its own words) since
            await self._set(part, _Problem(UNREACHABLE, True), detail)

    def refusal(self) -> Unavailable | None:
        """Why the server takes no new work now, as the error a caller gets (None: it
        does): DatabaseUnavailable while the database, either pool or the LISTEN
        connection fails."""
        if self._stopping:
            return Unavailable("the server is shutting down")
        first = self._first()
        if first is None:
            return None
        return DatabaseUnavailable(first.message) if first.database else Unavailable(first.message)

    async def check(
        self,
        engine: AsyncEngine,
        write_engine: AsyncEngine,
        cli_path: Path,
        *,
        migrate_first: bool,
    ) -> None:
        """The start-up checks of the database through both pools (migrating it first if
        asked) and of the agent CLI; `started` then says whether all passed."""
        cli = await _cli_problem(cli_path)
        self._checked.add(CLI)
        await self._set(CLI, None if cli is None else _Problem(cli, False), cli)
        await self._check_pool(DATABASE, engine, migrate_first)
        await self._check_pool(WRITES, write_engine, False)

    async def started(self) -> None:
        """The start-up checks are done: ready if every part is."""
        problems = [p for p in _ORDER if p in self._problems and p != STARTING]
        if problems:
            details = {p: self._details.get(p, self._problems[p].message) for p in problems}
            log.error("not ready: %s", "; ".join(details.values()))
            for part, detail in details.items():
                self._log(part).failed(detail, said=True)
        else:
            log.info("ready: database migrated, pools and LISTEN connected, agent CLI found")
        await self._set(STARTING, None, None, quiet=True)

    async def monitor(self, checks: list[PoolCheck], interval_s: float) -> None:
        """Re-check the pools every `interval_s` (each `always`, the others while they
        fail): readiness follows them down and back up without a restart."""
        while not self._stopping:
            await asyncio.sleep(interval_s)
            for check in checks:
                if (check.always or check.part in self._problems) and not self._stopping:
                    await self._check_pool(check.part, check.engine, False)

    async def _check_pool(self, part: str, engine: AsyncEngine, migrate_first: bool) -> None:
        problem, detail = await _database_problem(engine, migrate_first)
        self._checked.add(part)
        found = None if problem is None else _Problem(problem, detail is not None)
        await self._set(part, found, f"{_POOLS[part]}: {detail or problem}")

    async def _set(
        self, part: str, problem: _Problem | None, detail: str | None, *, quiet: bool = False
    ) -> None:
        """Record `part`'s problem (None: it has none), log it (see `_logs`), publish a
        change of readiness."""
        was = self._problems.get(part)
        if problem is None:
            if was is None:
                return
            del self._problems[part]
            self._details.pop(part, None)
            logged = self._logs.pop(part, None)
            if logged is not None and not quiet:
                logged.resolved()
                if self.problem is None:
                    log.info("ready")
        else:
            self._problems[part] = problem
            self._details[part] = detail or problem.message
            if STARTING not in self._problems and not self._stopping:
                self._log(part).failed(detail or problem.message)
            if problem == was:
                return  # the same for callers
        await self._publish()

    def _log(self, part: str) -> RecurringProblem:
        if part not in self._logs:
            self._logs[part] = RecurringProblem(log, f"readiness: {part}")
        return self._logs[part]

    async def _publish(self) -> None:
        # Read at each set: the last update to run publishes the current state.
        for name in READY_NAMES:
            await self.servicer.set(name, SERVING if self.problem is None else NOT_SERVING)
        room = self.problem is None and not self._full
        await self.servicer.set(ADMISSION, SERVING if room else NOT_SERVING)
        if self.problem is None:
            self.became_ready.set()

    def _spawn(self, update: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(update)
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    def dependencies(self) -> dict[str, bool]:
        """Whether each dependency is fine now (for the metrics): `server` is readiness
        itself; `database` reachable and migrated through both pools; `agent_cli` found
        and starting; `model_api` reached by the last model request; `sandbox` in use;
        `tenants_file` valid on disk. One not checked yet is not fine."""
        problems = self._problems
        return {
            "server": self.problem is None,
            "database": DATABASE in self._checked
            and DATABASE not in problems
            and WRITES not in problems,
            "agent_cli": CLI in self._checked and CLI not in problems,
            "model_api": self._model_api_reachable,
            "sandbox": self._sandboxed,
            "tenants_file": self._tenants_valid,
        }

    async def drain(self) -> None:
        """Draining: every name that invites work goes NOT_SERVING; liveness stays SERVING."""
        self._stopping = True
        for name in (*READY_NAMES, ADMISSION):
            await self.servicer.set(name, NOT_SERVING)

    async def shutdown(self) -> None:
        """NOT_SERVING for good (liveness too: the process is going away)."""
        self._stopping = True
        await self.servicer.enter_graceful_shutdown()


async def _database_problem(
    engine: AsyncEngine, migrate_first: bool
) -> tuple[str | None, str | None]:
    """What keeps the database from serving, for callers, and the driver's own words for
    the log (which may name hosts and databases: callers never see them); (None, None) when
    it serves. The detail is None when the database answers but its schema is behind."""
    try:
        async with asyncio.timeout(10), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        if migrate_first:
            await migrate(engine)
        if not await migrations_current(engine):
            return "the database schema is not current: run `agentplane-server migrate`", None
    except Exception as exc:  # noqa: BLE001  (any driver error means "not ready")
        return UNREACHABLE, unreachable(exc, engine.url)
    return None, None


def unreachable(error: BaseException, url: URL) -> str:
    """The log's words for a pool that cannot reach the database at `url`: the driver's
    cause and what to do (store/diagnosis.py)."""
    return f"the database is unreachable: {explain(error, url)}"


async def _cli_problem(cli_path: Path) -> str | None:
    if not cli_path.is_file() or not os.access(cli_path, os.X_OK):
        return f"the agent CLI was not found at {cli_path} (set AGENTPLANE_CLI_PATH)"
    env = {**os.environ, **NO_OUTBOUND_TRAFFIC}
    try:
        proc = await asyncio.create_subprocess_exec(
            str(cli_path),
            "--version",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    except (OSError, TimeoutError) as exc:
        return f"the agent CLI at {cli_path} does not start: {exc}"
    if proc.returncode != 0:
        return f"the agent CLI at {cli_path} failed: {out.decode(errors='replace')[:200]}"
    return None
