"""Drives one agent session through claude-agent-sdk's ClaudeSDKClient and its bundled CLI."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import claude_agent_sdk
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    CLIConnectionError,
    CLINotFoundError,
    ProcessError,
    ResultMessage,
)

from ..domain import ErrorReason, SessionState, TokenUsage, usd
from ..tenants import Tenant
from .cli_env import SessionDirs, cli_environment
from .live import LiveSession
from .reaper import kill_session_processes
from .requests import SessionSpec
from .translate import Verdict, to_events, verdict

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


@dataclass
class Outcome:
    """What a finished run produced."""

    verdict: Verdict
    cost_usd: str = "0"
    num_turns: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    sdk_session_id: str = ""
    result: str = ""


class AgentRunner:
    """Runs agents; knows the SDK and the CLI, nothing of gRPC or the database."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config

    def session_dirs(self, tenant: str, session_id: str) -> SessionDirs:
        return SessionDirs(self.config.work_dir / tenant / session_id.replace("-", "")[:16])

    def _options(self, spec: SessionSpec, tenant: Tenant, dirs: SessionDirs) -> ClaudeAgentOptions:
        extra = {}
        if self.config.cli_max_retries is not None:
            extra["CLAUDE_CODE_MAX_RETRIES"] = str(self.config.cli_max_retries)
        env = cli_environment(
            dirs,
            base_url=self.config.base_url,
            api_key=tenant.api_key() or "",
            scrub=self.config.scrub_env,
            extra=extra,
        )
        return ClaudeAgentOptions(
            # `tools` limits what exists; `allowed_tools` lets those run without a prompt.
            tools=list(spec.tools),
            allowed_tools=list(spec.tools),
            system_prompt=tenant.system_prompt,
            max_turns=spec.max_turns,
            max_budget_usd=float(spec.budget_usd),
            model=spec.model or None,
            cwd=str(dirs.cwd),
            env=env,
            cli_path=str(self.config.cli_path),
            setting_sources=[],
        )

    async def run(self, live: LiveSession, spec: SessionSpec, tenant: Tenant) -> Outcome:
        """Run the agent, publishing each SDK message as events; return how it ended.

        Agent failures become an ERROR outcome. A cancel request (live.cancel_requested)
        interrupts the agent and returns an ERROR outcome with live.cancel_reason, charged
        for what the agent used; whatever happens, no process of the session survives.
        """
        dirs = self.session_dirs(tenant.name, live.id)
        try:
            await asyncio.to_thread(self._prepare, dirs, tenant)
            options = self._options(spec, tenant, dirs)
            async with ClaudeSDKClient(options) as client:
                await client.query(spec.prompt)
                result = await self._drive(client, live, spec)
            completed = result is not None and verdict(result).state is SessionState.COMPLETE
            if live.cancel_requested.is_set() and not completed:
                return _cancelled(live, result)
            if result is None:
                return _failed("the agent ended without a result")
            return _from_result(result)
        except CLINotFoundError as exc:
            return _failed(f"the agent CLI was not found ({self.config.cli_path}): {exc}")
        except CLIConnectionError as exc:
            return _failed(f"the agent CLI could not be started: {exc}")
        except ProcessError as exc:
            return _failed(f"the agent CLI failed (exit code {exc.exit_code}): {exc}")
        except ClaudeSDKError as exc:
            return _failed(f"the agent failed: {exc}")
        finally:
            await asyncio.to_thread(kill_session_processes, dirs.config)
            await asyncio.to_thread(shutil.rmtree, dirs.root, True)

    async def _drive(
        self, client: ClaudeSDKClient, live: LiveSession, spec: SessionSpec
    ) -> ResultMessage | None:
        """Publish messages until the result.

        On a cancel request, or when the agent is silent for longer than the idle timeout
        or runs past its maximum duration (the CLI itself notices a stalled model stream
        only after 300 s), interrupt the agent and read briefly on for its error result.
        """
        messages = client.receive_response().__aiter__()
        cancel = asyncio.create_task(live.cancel_requested.wait())
        last = _now()
        end_at = last + spec.max_duration_s
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
                for kind, data in to_events(message):
                    live.emit(kind, data)
                if isinstance(message, ResultMessage):
                    return message
        finally:
            cancel.cancel()

    @staticmethod
    def _prepare(dirs: SessionDirs, tenant: Tenant) -> None:
        dirs.create()
        if tenant.workspace_template is not None:
            shutil.copytree(tenant.workspace_template, dirs.cwd, dirs_exist_ok=True)


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
    )


def _timeout_message(idle_s: float, max_s: float, *, ran_out: bool) -> str:
    if ran_out:
        return f"the session ran longer than its maximum of {max_s:g} s"
    return f"the agent produced nothing for {idle_s:g} s (AGENTPLANE_SESSION_IDLE_TIMEOUT_S)"


def _cancelled(live: LiveSession, result: ResultMessage | None) -> Outcome:
    """A cancelled run, charged for what the agent used before it stopped."""
    reason = live.cancel_reason or ErrorReason.CANCELLED
    outcome = _from_result(result) if result is not None else Outcome(Verdict(SessionState.ERROR))
    outcome.verdict = Verdict(SessionState.ERROR, reason, live.cancel_message)
    outcome.result = ""
    return outcome
