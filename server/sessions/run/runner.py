"""Runs one session's agent to its end: attempts, retries, and what it cost.

Knows the SDK and the CLI, nothing of gRPC or the database. Each attempt starts a CLI
(or uses the warm agent made for the session), sends the prompt and pumps its messages
(`pump.py`); transient failures are retried with a resumed conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import jsonschema
from claude_agent_sdk import (
    ClaudeSDKClient,
    ClaudeSDKError,
    CLIConnectionError,
    CLINotFoundError,
    ProcessError,
)

from ...domain import ErrorReason, EventKind, SessionState, usd
from ...gateway.meter import MeteredRequest, SessionMeter
from ...mcp.servers import SecretUnavailable
from ...money import shortfall
from ...sandbox.cli_env import SessionDirs
from ...sandbox.limits import Breach
from ...tenants import Tenant
from ..agents.launcher import Launcher
from ..agents.pool import WarmAgent
from ..caller_loop.inputs import InputWaiter
from ..caller_loop.loop import CallerLoop
from ..live import LiveSession
from ..pauses import SessionBudget
from ..run_request import SessionSpec
from ..workspace.files import Stamp, collect_artifacts, snapshot, write_input_files
from .limits_watch import watch_limits
from .outcome import Outcome
from .pump import pump
from .retry import RetryPolicy, transient_api_failure
from .translate import Verdict

log = logging.getLogger(__name__)

# What a retry tells the resumed agent (the failed turn is not in its transcript).
RESUME_PROMPT = "Continue with the task from where you left off."


@dataclass(frozen=True)
class RunnerConfig:
    """How runs are driven and retried."""

    # How long an interrupted agent gets to stop before its processes are killed.
    interrupt_grace_s: float = 5.0
    # A session with no message for this long is interrupted and ends ERROR/TIMEOUT.
    idle_timeout_s: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class AgentRun:
    """One session's run: what it asked for, where it runs, its meter, and the totals of
    the attempts so far."""

    live: LiveSession
    spec: SessionSpec
    tenant: Tenant
    dirs: SessionDirs
    meter: SessionMeter
    # Event-loop time by which the run must end (the tenant's max_duration_s).
    end_at: float
    # The warm agent made for this session; serves the first attempt only.
    warm: WarmAgent | None = None
    total: Outcome = field(default_factory=lambda: Outcome(Verdict(SessionState.ERROR)))
    # CLIs started for the session so far (the warm agent's included).
    starts: int = 0
    # The sandbox limit the session hit so far (always None without a sandbox).
    breach: Callable[[], Breach | None] = lambda: None
    # The caller's tools and hook, when the session has its caller in the loop.
    caller: CallerLoop | None = None

    def stopped(self) -> Outcome:
        """The totals so far, ended by the stop request (cancel, shutdown, timeout)."""
        return self.total.stopped(
            self.live.cancel_reason or ErrorReason.CANCELLED, self.live.cancel_message
        )


class AgentRunner:
    """Runs agents; see the module docstring."""

    def __init__(self, config: RunnerConfig, launcher: Launcher) -> None:
        self.config = config
        self._launcher = launcher

    async def run(
        self,
        live: LiveSession,
        spec: SessionSpec,
        tenant: Tenant,
        warm: WarmAgent | None = None,
        on_model_request: Callable[[MeteredRequest], None] | None = None,
        waiter: InputWaiter | None = None,
        budget: SessionBudget | None = None,
    ) -> Outcome:
        """Run the agent, publishing each SDK message as events; return how it ended.

        Transient failures (the CLI cannot start or dies, the model API keeps answering
        429/5xx) are retried per the retry policy: each retry is announced as a `retrying`
        event, re-checks the budget and resumes the SDK session instead of re-running paid
        turns. `warm`, a warm agent started for this session's id with the options `spec`
        gives, serves the first attempt in place of a new CLI. A cancel request
        (live.cancel_requested) interrupts the agent; the outcome is then ERROR with
        live.cancel_reason, charged for what the agent used. Whatever happens, no process
        of the session survives. `waiter` asks the caller, for a session with its caller
        in the loop (spec.in_the_loop); `budget` takes raises of the session's budget to
        its meter (and holds what the budget cannot cover, for a session that pauses).
        """
        dirs = self._launcher.folders.dirs(tenant.name, live.id)
        if warm is not None:
            if not warm.fits(live.id, spec):
                raise ValueError(f"warm agent {warm.session_id} does not fit session {live.id}")
            meter = warm.meter
            meter.budget_usd = usd(spec.budget_usd)
        else:
            meter = self._launcher.open_meter(live.id, tenant, spec.budget_usd, spec)
        meter.on_request = on_model_request
        if budget is not None:
            budget.attach(meter, pauses=spec.pauses)
        run = AgentRun(
            live,
            spec,
            tenant,
            dirs,
            meter,
            _now() + spec.max_duration_s,
            warm,
            breach=lambda: self._launcher.breach(dirs, tenant),
            caller=CallerLoop(spec, waiter, str(dirs.cwd)) if waiter else None,
        )
        watch: asyncio.Task[None] | None = None
        # What its CLIs mirror of its transcript counts against what the session may store.
        self._launcher.charge_to(live.id, live.charge)
        try:
            if warm is None:
                try:
                    await self._launcher.folders.prepare(dirs, tenant)
                except OSError as exc:  # no tmpfs, no cgroup, no free uid
                    return Outcome.failed(f"the session's sandbox could not be prepared: {exc}")
            else:
                warm.unmark()
            try:
                before = await asyncio.to_thread(self._bring_in, spec, tenant, dirs)
            except OSError as exc:
                return Outcome.failed(f"the input files could not be written: {exc}")
            if self._launcher.sandboxes is not None:
                watch = asyncio.create_task(watch_limits(run.breach, live))
            outcome = await self._attempts(run)
            # A request the CLI saw end may still be settling in the gateway.
            for _ in range(100):
                if not meter.in_flight:
                    break
                await asyncio.sleep(0.05)
            # The gateway's meter is the cost; the SDK's own estimate is kept beside it.
            outcome.sdk_total_usd = outcome.cost_usd
            outcome.cost_usd = usd(meter.spent_usd)
            outcome.shortfalls = shortfall.by_model(
                outcome.sdk_total_usd,
                outcome.cost_usd,
                outcome.sdk_model_costs,
                meter.cost_by_model,
                spec.model,
            )
            # So are its tokens and turns: the CLI reports none for a turn it was stopped
            # in, or no result at all, yet counts the stopped turn.
            outcome.usage = meter.usage
            outcome.num_turns = (
                min(outcome.num_turns, meter.answered) if outcome.num_turns else meter.answered
            )
            if meter.exhausted and outcome.verdict.state is not SessionState.COMPLETE:
                outcome.verdict = Verdict(
                    SessionState.ERROR,
                    ErrorReason.BUDGET_EXCEEDED,
                    f"the session's budget of {meter.budget_usd} USD was used up",
                )
            # A limit hit ends the session ERROR even if the agent answered meanwhile.
            if live.event_limit_message:
                outcome.verdict = Verdict(
                    SessionState.ERROR, ErrorReason.EVENT_LIMIT, live.event_limit_message
                )
            breach = run.breach()
            if breach is not None:
                outcome.verdict = Verdict(SessionState.ERROR, breach.reason, breach.message)
            if spec.output_schema is not None and outcome.verdict.state is SessionState.COMPLETE:
                outcome.verdict = check_structured(outcome.structured, spec.output_schema)
            outcome.artifacts = await asyncio.to_thread(
                collect_artifacts, self._launcher.folders.work_dir, dirs.cwd, before, tenant.files
            )
            return outcome
        finally:
            if watch is not None:
                watch.cancel()
            try:
                await self._launcher.release(live.id, dirs)
            finally:
                self._launcher.charge_to(live.id, None)

    async def _attempts(self, run: AgentRun) -> Outcome:
        """Attempts until one ends for good (see `run`)."""
        policy = self.config.retry
        live = run.live
        attempt = 1
        while True:
            outcome, transient = await self._attempt(run)
            run.warm = None  # used up: a retry starts a new CLI
            run.total = run.total.plus(outcome)
            total = run.total
            breach = run.breach()
            if breach is not None:  # a limit is never transient: no retry
                live.request_cancel(breach.reason, breach.message)
            if live.cancel_requested.is_set() and total.verdict.state is not SessionState.COMPLETE:
                return run.stopped()
            if not transient or attempt >= policy.attempts:
                return total
            if run.meter.exhausted or run.meter.spent_usd >= run.meter.budget_usd:
                total.verdict = Verdict(
                    SessionState.ERROR,
                    ErrorReason.BUDGET_EXCEEDED,
                    f"the session's budget was used up before a retry ({total.verdict.message})",
                )
                return total
            attempt += 1
            delay = policy.delay_s(attempt)
            live.emit(
                EventKind.RETRYING,
                {
                    "attempt": attempt,
                    "delay_ms": int(delay * 1000),
                    "reason": total.verdict.message,
                },
            )
            log.warning(
                "retry",
                extra={
                    "session_id": live.id,
                    "tenant": run.tenant.name,
                    "attempt": attempt,
                    "delay_s": round(delay, 3),
                    "reason": total.verdict.reason.value if total.verdict.reason else None,
                    "detail": total.verdict.message[:500],
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.cancel_requested.wait(), delay)
            if live.cancel_requested.is_set():
                return run.stopped()

    async def _attempt(self, run: AgentRun) -> tuple[Outcome, bool]:
        """One run of the CLI; returns its outcome and whether a retry may help."""
        live, spec, before = run.live, run.spec, run.total
        transcripts = self._launcher.transcripts(run.tenant.name)
        resume = before.sdk_session_id or spec.resume_sdk_session_id or None
        if resume and not await transcripts.has(resume):
            resume = None  # a CLI killed before its first answer saved nothing: start afresh
        try:
            connected: contextlib.AbstractAsyncContextManager[ClaudeSDKClient]
            if run.warm is not None:
                connected = run.warm.connected()
            else:
                if run.starts:  # an agent ran in this folder before: seal it again
                    await self._launcher.reseal(run.dirs)
                connected = ClaudeSDKClient(
                    self._launcher.options(
                        spec,
                        run.tenant,
                        run.dirs,
                        run.meter,
                        resume=resume,
                        # The gateway's meter holds a session that pauses at its budget:
                        # the CLI's own check would end it at its first budget.
                        budget=None if spec.pauses else run.meter.remaining_usd,
                        max_turns=max(1, spec.max_turns - before.num_turns),
                        caller=run.caller,
                    )
                )
            run.starts += 1
            async with connected as client:
                retrying = resume is not None and resume == before.sdk_session_id
                await client.query(RESUME_PROMPT if retrying else spec.prompt)
                result = await pump(
                    client,
                    live,
                    end_at=run.end_at,
                    max_duration_s=spec.max_duration_s,
                    idle_timeout_s=self.config.idle_timeout_s,
                    interrupt_grace_s=self.config.interrupt_grace_s,
                )
            if result is None:  # the CLI's output ended early: it died or hung up
                outcome = Outcome.failed("the agent CLI stopped without a result")
                outcome.sdk_session_id = live.sdk_session_id
                return outcome, not live.cancel_requested.is_set()
            outcome = Outcome.of_result(result)
            if retrying and before.sdk_total_usd is not None:
                # Resumed in the same cwd, the CLI restores its running cost total (it keeps
                # it per project directory): this attempt cost what the total grew by.
                outcome.cost_usd = usd(max(outcome.cost_usd - before.sdk_total_usd, Decimal(0)))
            return outcome, transient_api_failure(outcome.verdict.reason, result.api_error_status)
        except SecretUnavailable as exc:  # checked at admission: it went away since
            return Outcome.failed(f"an MCP server's secret is unavailable: {exc}"), False
        except CLINotFoundError as exc:
            cli = self._launcher.config.cli_path
            return Outcome.failed(f"the agent CLI was not found ({cli}): {exc}"), False
        except CLIConnectionError as exc:
            return Outcome.failed(f"the agent CLI could not be started: {exc}"), True
        except ProcessError as exc:
            outcome = Outcome.failed(f"the agent CLI failed (exit code {exc.exit_code}): {exc}")
            outcome.sdk_session_id = live.sdk_session_id
            return outcome, True
        except ClaudeSDKError as exc:
            return Outcome.failed(f"the agent failed: {exc}"), False

    def _bring_in(self, spec: SessionSpec, tenant: Tenant, dirs: SessionDirs) -> dict[str, Stamp]:
        """Write the request's input files; what the workspace holds before the agent runs."""
        work_dir = self._launcher.folders.work_dir
        owner = self._launcher.folders.owner(dirs.root, tenant)
        write_input_files(work_dir, dirs.cwd, spec.input_files, owner)
        return snapshot(work_dir, dirs.cwd)


def check_structured(value: Any, schema: dict[str, Any]) -> Verdict:
    """COMPLETE if the structured result matches `schema`, else ERROR/INVALID_OUTPUT."""
    if value is None:
        return Verdict(
            SessionState.ERROR,
            ErrorReason.INVALID_OUTPUT,
            "the agent returned no structured result",
        )
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(value)
    )
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(the result)"
        return Verdict(
            SessionState.ERROR,
            ErrorReason.INVALID_OUTPUT,
            f"the structured result does not match the schema at {where}: {error.message[:500]}",
        )
    return Verdict(SessionState.COMPLETE)


def _now() -> float:
    return asyncio.get_running_loop().time()
