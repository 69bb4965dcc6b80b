"""Drives one agent session through claude-agent-sdk's ClaudeSDKClient and its bundled CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shlex
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import claude_agent_sdk
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    CLIConnectionError,
    CLINotFoundError,
    ProcessError,
    ResultMessage,
    SessionStore,
    SystemMessage,
)

from ..budgets.gateway import MeteringGateway
from ..budgets.gateway_meter import MeteredRequest, SessionMeter
from ..domain import ErrorReason, EventKind, Session, SessionState, TokenUsage, usd
from ..store.transcripts import SqlSessionStore, TenantTranscripts
from ..tenants import Tenant
from .cli_env import SessionDirs, cli_environment
from .live import LiveSession
from .reaper import kill_session_processes
from .requests import SessionSpec
from .retry import RetryPolicy, transient_api_failure
from .translate import Verdict, to_events, verdict

log = logging.getLogger(__name__)

# What a retry tells the resumed agent (the failed turn is not in its transcript).
RESUME_PROMPT = "Continue with the task from where you left off."

ANTHROPIC_API = "https://api.anthropic.com"

# The longest line of the CLI's output the SDK accepts (its default, 1 MiB, fails a session
# whose one assistant message or transcript-mirror frame is larger: 1,000 parallel tool
# uses, say, or a long answer).
MAX_CLI_MESSAGE_BYTES = 64 << 20

BUNDLED_CLI = Path(claude_agent_sdk.__file__).resolve().parent / "_bundled" / "claude"


@dataclass(frozen=True)
class RunnerConfig:
    """What every session's CLI is started with."""

    work_dir: Path
    base_url: str | None = None
    cli_path: Path = BUNDLED_CLI
    cli_max_retries: int | None = None
    # Environment variables of the server that must not reach any agent (tenants' keys).
    scrub_env: frozenset[str] = field(default_factory=frozenset)
    # How long an interrupted agent gets to stop before its processes are killed.
    interrupt_grace_s: float = 5.0
    # A session with no message for this long is interrupted and ends ERROR/TIMEOUT.
    idle_timeout_s: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class Outcome:
    """What a finished run produced."""

    verdict: Verdict
    cost_usd: str = "0"
    num_turns: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    sdk_session_id: str = ""
    result: str = ""
    # The SDK's own running total for the conversation, as the CLI last reported it.
    sdk_total_usd: str | None = None

    def plus(self, later: Outcome) -> Outcome:
        """The totals after a further attempt, which decides the verdict."""
        return Outcome(
            verdict=later.verdict,
            cost_usd=str(usd(Decimal(self.cost_usd) + Decimal(later.cost_usd))),
            num_turns=self.num_turns + later.num_turns,
            usage=self.usage.plus(later.usage),
            sdk_session_id=later.sdk_session_id or self.sdk_session_id,
            result=later.result,
            sdk_total_usd=later.sdk_total_usd or self.sdk_total_usd,
        )

    def stopped(self, live: LiveSession) -> Outcome:
        """This outcome, ended by a stop request (cancel, shutdown, timeout)."""
        reason = live.cancel_reason or ErrorReason.CANCELLED
        return replace(self, verdict=Verdict(SessionState.ERROR, reason, live.cancel_message),
                       result="")


# Marks the folder of a warm agent no session has taken yet; holds the server's pid.
WARM_MARKER = ".warm"

PoolKey = tuple[tuple[str, ...], str, int, Decimal]


def pool_key(spec: SessionSpec) -> PoolKey | None:
    """What a CLI's options depend on at spawn, for matching a request to a warm agent
    (None: the request resumes a conversation, which is fixed at spawn too)."""
    if spec.resume_session_id:
        return None
    return (spec.tools, spec.model, spec.max_turns, spec.budget_usd)


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

    def alive(self) -> bool:
        """Whether its CLI process still runs."""
        process = getattr(getattr(self.client, "_transport", None), "_process", None)
        return process is not None and process.returncode is None


class AgentRunner:
    """Runs agents; knows the SDK and the CLI, nothing of gRPC or the database."""

    def __init__(
        self, config: RunnerConfig, store: SqlSessionStore, gateway: MeteringGateway
    ) -> None:
        self.config = config
        self._store = store
        self._gateway = gateway

    async def clean_up(self, session: Session) -> None:
        """Kill what is left of a session a dead server ran here, and remove its folder."""
        await self.remove_folder(self.session_dirs(session.tenant, session.id).root)

    async def remove_folder(self, root: Path) -> None:
        """Kill every process of the session folder `root` (tools included), remove it."""
        await asyncio.to_thread(_remove_folder, root)

    def _cli_for(self, tenant: Tenant) -> Path:
        """The CLI, or for a tenant with an os_user a launcher that becomes that user first.

        Not the SDK's `user` option: that makes Python fork() (not vfork) a process full of
        gRPC threads, whose fork handlers can crash the child.
        """
        if tenant.os_user is None:
            return self.config.cli_path
        launcher = self.config.work_dir / ".launchers" / f"{tenant.name}.sh"
        if not launcher.exists():
            entry = pwd.getpwnam(tenant.os_user)
            launcher.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            tmp = launcher.with_suffix(".tmp")
            tmp.write_text(
                "#!/bin/sh\n"
                f"exec setpriv --reuid={entry.pw_uid} --regid={entry.pw_gid} "
                f"--init-groups -- {shlex.quote(str(self.config.cli_path))} \"$@\"\n"
            )
            tmp.chmod(0o755)
            tmp.replace(launcher)
        return launcher

    def check_model(self, model: str) -> None:
        """Raise UnknownModel (INVALID_ARGUMENT on `model`) for a model the price table lacks;
        an empty model is the CLI's default, which the table covers."""
        if model:
            self._gateway.prices.price(model)

    def transcripts(self, tenant: str) -> TenantTranscripts:
        """The tenant's SDK transcripts (the SessionStore the CLI mirrors into)."""
        return TenantTranscripts(self._store, tenant)

    def session_dirs(self, tenant: str, session_id: str) -> SessionDirs:
        return SessionDirs(self.config.work_dir / tenant / session_id.replace("-", "")[:16])

    async def prestart(self, tenant: Tenant, spec: SessionSpec) -> WarmAgent:
        """Start and connect a CLI with the options `spec` gives, for a session to come.

        Its meter has no budget until a session takes it, so the agent cannot spend
        anything while it waits.
        """
        key = pool_key(spec)
        if key is None:
            raise ValueError("a warm agent cannot resume a conversation")
        session_id = str(uuid.uuid4())
        dirs = self.session_dirs(tenant.name, session_id)
        meter = self._open_meter(session_id, tenant, Decimal(0))
        try:
            await asyncio.to_thread(self._prepare, dirs, tenant)
            (dirs.root / WARM_MARKER).write_text(str(os.getpid()))
            options = self._options(
                spec, tenant, dirs, resume=None, budget=spec.budget_usd,
                max_turns=spec.max_turns, transcripts=self.transcripts(tenant.name), meter=meter,
            )
            client = ClaudeSDKClient(options)
            await client.connect()
        except BaseException:
            await self._release(session_id, dirs)
            raise
        return WarmAgent(session_id, tenant.name, key, dirs, client, meter, _now())

    async def discard(self, agent: WarmAgent) -> None:
        """Stop a warm agent no session will use, and remove its folder."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.client.disconnect(), self.config.interrupt_grace_s)
        await self._release(agent.session_id, agent.dirs)

    async def _release(self, session_id: str, dirs: SessionDirs) -> None:
        self._gateway.close_session(session_id)
        await self.remove_folder(dirs.root)

    def _open_meter(self, session_id: str, tenant: Tenant, budget: Decimal) -> SessionMeter:
        return self._gateway.open_session(
            session_id,
            budget_usd=budget,
            upstream_base_url=self.config.base_url or ANTHROPIC_API,
            upstream_api_key=tenant.api_key() or "",
        )

    def _options(
        self, spec: SessionSpec, tenant: Tenant, dirs: SessionDirs, *,
        resume: str | None, budget: Decimal, max_turns: int, transcripts: TenantTranscripts,
        meter: SessionMeter,
    ) -> ClaudeAgentOptions:
        extra = {}
        if self.config.cli_max_retries is not None:
            extra["CLAUDE_CODE_MAX_RETRIES"] = str(self.config.cli_max_retries)
        # The CLI talks to the metering gateway with a per-session token; the tenant's real
        # key stays in this process and is added by the gateway.
        env = cli_environment(
            dirs,
            base_url=self._gateway.base_url,
            api_key=meter.token,
            scrub=self.config.scrub_env,
            extra=extra,
        )
        return ClaudeAgentOptions(
            # `tools` limits what exists; `allowed_tools` lets those run without a prompt.
            tools=list(spec.tools),
            allowed_tools=list(spec.tools),
            system_prompt=tenant.system_prompt,
            max_turns=max_turns,
            max_budget_usd=float(budget),
            resume=resume,
            # Transcripts are mirrored to the database, so a resume works on any replica.
            session_store=cast(SessionStore, transcripts),
            model=spec.model or None,
            cwd=str(dirs.cwd),
            env=env,
            cli_path=str(self._cli_for(tenant)),
            setting_sources=[],
            max_buffer_size=MAX_CLI_MESSAGE_BYTES,
        )

    async def run(
        self, live: LiveSession, spec: SessionSpec, tenant: Tenant,
        on_model_request: Callable[[MeteredRequest], None] | None = None,
        warm: WarmAgent | None = None,
    ) -> Outcome:
        """Run the agent, publishing each SDK message as events; return how it ended.

        Transient failures (the CLI cannot start or dies, the model API keeps answering
        429/5xx) are retried per the retry policy: each retry is announced as a `retrying`
        event, re-checks the budget and resumes the SDK session instead of re-running paid
        turns. `warm`, a warm agent started for this session's id with the options `spec`
        gives, serves the first attempt in place of a new CLI. A cancel request (live.cancel_requested) interrupts the agent; the outcome
        is then ERROR with live.cancel_reason, charged for what the agent used. Whatever
        happens, no process of the session survives.
        """
        dirs = self.session_dirs(tenant.name, live.id)
        if warm is not None:
            if warm.session_id != live.id or warm.key != pool_key(spec):
                raise ValueError(f"warm agent {warm.session_id} does not fit session {live.id}")
            meter = warm.meter
            meter.budget_usd = usd(spec.budget_usd)
        else:
            meter = self._open_meter(live.id, tenant, spec.budget_usd)
        meter.on_request = on_model_request
        try:
            if warm is None:
                await asyncio.to_thread(self._prepare, dirs, tenant)
            else:
                (dirs.root / WARM_MARKER).unlink(missing_ok=True)
            outcome = await self._attempts(live, spec, tenant, dirs, meter, warm)
            # A request the CLI saw end may still be settling in the gateway.
            for _ in range(100):
                if not meter.in_flight:
                    break
                await asyncio.sleep(0.05)
            # The gateway's meter is the cost; the SDK's own estimate is kept beside it.
            outcome.sdk_total_usd = outcome.cost_usd
            outcome.cost_usd = str(usd(meter.spent_usd))
            if meter.exhausted and outcome.verdict.state is not SessionState.COMPLETE:
                outcome.verdict = Verdict(
                    SessionState.ERROR, ErrorReason.BUDGET_EXCEEDED,
                    f"the session's budget of {spec.budget_usd} USD was used up",
                )
            return outcome
        finally:
            await self._release(live.id, dirs)

    async def _attempts(
        self, live: LiveSession, spec: SessionSpec, tenant: Tenant, dirs: SessionDirs,
        meter: SessionMeter, warm: WarmAgent | None,
    ) -> Outcome:
        """Attempts until one ends for good (see `run`)."""
        policy = self.config.retry
        total = Outcome(Verdict(SessionState.ERROR))
        end_at = _now() + spec.max_duration_s
        attempt = 1
        while True:
            outcome, transient = await self._attempt(
                live, spec, tenant, dirs, total, end_at, meter, warm
            )
            warm = None  # used up: a retry starts a new CLI
            total = total.plus(outcome)
            if live.cancel_requested.is_set() and total.verdict.state is not SessionState.COMPLETE:
                return total.stopped(live)
            if not transient or attempt >= policy.attempts:
                return total
            if meter.exhausted or meter.spent_usd >= spec.budget_usd:
                total.verdict = Verdict(
                    SessionState.ERROR, ErrorReason.BUDGET_EXCEEDED,
                    f"the session's budget was used up before a retry ({total.verdict.message})",
                )
                return total
            attempt += 1
            delay = policy.delay_s(attempt)
            live.emit(EventKind.RETRYING, {
                "attempt": attempt, "delay_ms": int(delay * 1000), "reason": total.verdict.message,
            })
            log.warning("retry", extra={
                "session_id": live.id, "tenant": tenant.name, "attempt": attempt,
                "delay_s": round(delay, 3),
                "reason": total.verdict.reason.value if total.verdict.reason else None,
                "detail": total.verdict.message[:500],
            })
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.cancel_requested.wait(), delay)
            if live.cancel_requested.is_set():
                return total.stopped(live)

    async def _attempt(
        self, live: LiveSession, spec: SessionSpec, tenant: Tenant, dirs: SessionDirs,
        before: Outcome, end_at: float, meter: SessionMeter, warm: WarmAgent | None = None,
    ) -> tuple[Outcome, bool]:
        """One run of the CLI; returns its outcome and whether a retry may help."""
        transcripts = self.transcripts(tenant.name)
        resume = before.sdk_session_id or spec.resume_sdk_session_id or None
        if resume and not await transcripts.has(resume):
            resume = None  # a CLI killed before its first answer saved nothing: start afresh
        remaining = meter.remaining_usd
        turns_left = max(1, spec.max_turns - before.num_turns)
        try:
            connected: contextlib.AbstractAsyncContextManager[ClaudeSDKClient]
            if warm is not None:
                connected = _connected(warm.client)
            else:
                options = self._options(spec, tenant, dirs, resume=resume, budget=remaining,
                                        max_turns=turns_left, transcripts=transcripts, meter=meter)
                connected = ClaudeSDKClient(options)
            async with connected as client:
                retrying = resume is not None and resume == before.sdk_session_id
                await client.query(RESUME_PROMPT if retrying else spec.prompt)
                result = await self._drive(client, live, spec, end_at)
            if result is None:  # the CLI's output ended early: it died or hung up
                outcome = _failed("the agent CLI stopped without a result")
                outcome.sdk_session_id = live.sdk_session_id
                return outcome, not live.cancel_requested.is_set()
            outcome = _from_result(result)
            if retrying and before.sdk_total_usd is not None:
                # Resumed in the same cwd, the CLI restores its running cost total (it keeps
                # it per project directory): this attempt cost what the total grew by.
                cost = Decimal(outcome.cost_usd) - Decimal(before.sdk_total_usd)
                outcome.cost_usd = str(usd(max(cost, Decimal(0))))
            return outcome, transient_api_failure(outcome.verdict.reason, result.api_error_status)
        except CLINotFoundError as exc:
            return _failed(f"the agent CLI was not found ({self.config.cli_path}): {exc}"), False
        except CLIConnectionError as exc:
            return _failed(f"the agent CLI could not be started: {exc}"), True
        except ProcessError as exc:
            outcome = _failed(f"the agent CLI failed (exit code {exc.exit_code}): {exc}")
            outcome.sdk_session_id = live.sdk_session_id
            return outcome, True
        except ClaudeSDKError as exc:
            return _failed(f"the agent failed: {exc}"), False

    async def _drive(
        self, client: ClaudeSDKClient, live: LiveSession, spec: SessionSpec, end_at: float
    ) -> ResultMessage | None:
        """Publish messages until the result.

        On a cancel request, or when the agent is silent for longer than the idle timeout
        or runs past its maximum duration (the CLI itself notices a stalled model stream
        only after 300 s), interrupt the agent and read briefly on for its error result.
        """
        messages = client.receive_response().__aiter__()
        cancel = asyncio.create_task(live.cancel_requested.wait())
        last = _now()
        interrupt_deadline: float | None = None
        # One pending read at a time, never cancelled while the agent may still answer:
        # cancelling an async generator's __anext__ closes it and loses the result.
        pull: asyncio.Future[Any] | None = None
        try:
            while True:
                if pull is None:
                    pull = asyncio.ensure_future(messages.__anext__())
                if interrupt_deadline is None:
                    wake_at = min(last + self.config.idle_timeout_s, end_at)
                    done, _ = await asyncio.wait(
                        {pull, cancel}, timeout=max(0.0, wake_at - _now()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not done:
                        live.request_cancel(ErrorReason.TIMEOUT, _timeout_message(
                            self.config.idle_timeout_s, spec.max_duration_s, ran_out=_now() >= end_at
                        ))
                    if pull not in done:
                        interrupt_deadline = _now() + self.config.interrupt_grace_s
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(client.interrupt(), self.config.interrupt_grace_s)
                        continue
                else:
                    done, _ = await asyncio.wait({pull}, timeout=max(0.0, interrupt_deadline - _now()))
                    if not done:  # the agent did not stop in time: its processes get killed
                        pull.cancel()
                        return None
                try:
                    message = pull.result()
                except StopAsyncIteration:
                    return None
                pull, last = None, _now()
                if isinstance(message, SystemMessage) and message.subtype == "init":
                    live.sdk_session_id = str(message.data.get("session_id") or "")
                for kind, data in to_events(message):
                    live.emit(kind, data)
                if isinstance(message, ResultMessage):
                    return message
        finally:
            cancel.cancel()

    def _prepare(self, dirs: SessionDirs, tenant: Tenant) -> None:
        # The tenant's folder is 0700 (and its os_user's), so no other tenant's agent,
        # running as another user, can even list it.
        tenant_root = self.config.work_dir / tenant.name
        tenant_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tenant_root.chmod(0o700)
        if tenant.os_user is not None:
            shutil.chown(tenant_root, tenant.os_user, pwd.getpwnam(tenant.os_user).pw_gid)
        dirs.create(owner=tenant.os_user)
        if tenant.workspace_template is not None:
            shutil.copytree(tenant.workspace_template, dirs.cwd, dirs_exist_ok=True)
            if tenant.os_user is not None:
                for path in [dirs.cwd, *dirs.cwd.rglob("*")]:
                    shutil.chown(path, tenant.os_user, pwd.getpwnam(tenant.os_user).pw_gid)


def _remove_folder(root: Path) -> None:
    kill_session_processes(root)
    shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def _connected(client: ClaudeSDKClient) -> AsyncIterator[ClaudeSDKClient]:
    """An already connected client, as `async with ClaudeSDKClient(...)` gives a new one."""
    try:
        yield client
    finally:
        await client.disconnect()


def _now() -> float:
    return asyncio.get_running_loop().time()


def _failed(message: str) -> Outcome:
    return Outcome(Verdict(SessionState.ERROR, ErrorReason.AGENT_FAILED, message[:2000]))


def _from_result(result: ResultMessage) -> Outcome:
    return Outcome(
        verdict=verdict(result),
        cost_usd=str(usd(result.total_cost_usd or 0)),
        num_turns=result.num_turns,
        usage=TokenUsage.from_sdk(result.usage),
        sdk_session_id=result.session_id or "",
        result=(result.result or "") if not result.is_error else "",
        sdk_total_usd=str(usd(result.total_cost_usd or 0)),
    )


def _timeout_message(idle_s: float, max_s: float, *, ran_out: bool) -> str:
    if ran_out:
        return f"the session ran longer than its maximum of {max_s:g} s"
    return f"the agent produced nothing for {idle_s:g} s (AGENTPLANE_SESSION_IDLE_TIMEOUT_S)"
