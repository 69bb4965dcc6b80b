"""Launching an agent: which CLI runs for a tenant, its meter, and its SDK options."""

from __future__ import annotations

import asyncio
import logging
import pwd
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import cast

import claude_agent_sdk
from claude_agent_sdk import ClaudeAgentOptions, SessionStore

from ...gateway.meter import SessionMeter
from ...gateway.proxy import MeteringGateway
from ...mcp.cli_config import cli_servers, session_servers
from ...mcp.servers import PREFIX as MCP_PREFIX
from ...mcp.servers import RemoteServer
from ...money.pricing import UnknownModel
from ...sandbox.cli_env import SessionDirs, cli_environment
from ...sandbox.folders import SessionFolders
from ...sandbox.limits import Breach
from ...sandbox.sandboxes import Sandboxes
from ...store.transcripts import ChargedTranscripts, SqlSessionStore, TenantTranscripts
from ...tenants import Tenant
from ..caller_loop.loop import CallerLoop
from ..run_request import SessionSpec

ANTHROPIC_API = "https://api.anthropic.com"
log = logging.getLogger(__name__)

# The longest line of the CLI's output the SDK accepts (its default, 1 MiB, fails a session
# whose one assistant message or transcript-mirror frame is larger: 1,000 parallel tool
# uses, say, or a long answer).
MAX_CLI_MESSAGE_BYTES = 64 << 20
# How much longer than its pause may last the CLI waits for a request held at the budget
# (the answer itself may take minutes once the request goes on).
PAUSED_REQUEST_MARGIN_S = 600.0

BUNDLED_CLI = Path(claude_agent_sdk.__file__).resolve().parent / "_bundled" / "claude"


class CliStderr:
    """Logs (at DEBUG) what one CLI writes to its stderr: at most `MAX_LINES` lines of at
    most `MAX_CHARS` characters, since a tool of the agent can write there too."""

    MAX_LINES = 200
    MAX_CHARS = 1000

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.lines = 0

    def __call__(self, line: str) -> None:
        self.lines += 1
        if self.lines <= self.MAX_LINES:
            log.debug(
                "cli_stderr",
                extra={"session_id": self.session_id, "line": line[: self.MAX_CHARS]},
            )
        elif self.lines == self.MAX_LINES + 1:
            log.debug("cli_stderr_truncated", extra={"session_id": self.session_id})


@dataclass(frozen=True)
class LaunchConfig:
    """What every session's CLI is started with."""

    work_dir: Path
    base_url: str | None = None
    cli_path: Path = BUNDLED_CLI
    cli_max_retries: int | None = None
    # Environment variables of the server that must not reach any agent (tenants' keys).
    scrub_env: frozenset[str] = field(default_factory=frozenset)


class Launcher:
    """Everything a new agent CLI needs: its folder, its meter at the gateway, its options.

    Shared by cold starts (the runner) and warm agents (the pool), so both start exactly
    the same CLI.
    """

    def __init__(
        self,
        config: LaunchConfig,
        store: SqlSessionStore,
        gateway: MeteringGateway,
        sandboxes: Sandboxes | None = None,
    ) -> None:
        self.config = config
        self.sandboxes = sandboxes
        self.folders = SessionFolders(config.work_dir, sandboxes)
        self._store = store
        self._gateway = gateway
        # What each running session's transcript is charged to (see `charge_to`).
        self._charges: dict[str, Callable[[int], bool]] = {}

    def scrub_also(self, names: Iterable[str]) -> None:
        """Keep these variables (a reloaded file's key variables) from agents from now on;
        those scrubbed before stay scrubbed (a removed tenant's key is still in the env)."""
        self.config = replace(self.config, scrub_env=self.config.scrub_env | frozenset(names))

    def check_model(self, model: str, field: str = "model") -> None:
        """Raise UnknownModel (INVALID_ARGUMENT on `field`) for a model the price table lacks;
        an empty model is the CLI's default, which the table covers."""
        if model and model not in self._gateway.prices:
            raise UnknownModel(model, self._gateway.prices.version, field)

    def transcripts(self, tenant: str) -> TenantTranscripts:
        """The tenant's SDK transcripts (the SessionStore the CLI mirrors into)."""
        return TenantTranscripts(self._store, tenant)

    def charge_to(self, session_id: str, charge: Callable[[int], bool] | None) -> None:
        """Charge what the CLIs of the session mirror of its transcript to `charge` from
        now on (None: to nothing; a warm agent waiting for its session mirrors nothing)."""
        if charge is None:
            self._charges.pop(session_id, None)
        else:
            self._charges[session_id] = charge

    def _charged(self, session_id: str, size: int) -> bool:
        charge = self._charges.get(session_id)
        return charge is None or charge(size)

    def open_meter(
        self, session_id: str, tenant: Tenant, budget: Decimal, spec: SessionSpec
    ) -> SessionMeter:
        """The session's meter at the gateway: its token is the CLI's API key, and lets it
        reach the remote MCP servers of its tools (only those) through the gateway."""
        remote = [
            s
            for s in session_servers(spec.tools, tenant.mcp_servers)
            if isinstance(s, RemoteServer)
        ]
        return self._gateway.open_session(
            session_id,
            budget_usd=budget,
            upstream_base_url=self.config.base_url or ANTHROPIC_API,
            upstream_api_key=tenant.api_key() or "",
            mcp_servers={server.name: server for server in remote},
            tools=spec.tools,
            max_server_tool_uses=tenant.max_server_tool_uses_per_request,
        )

    async def reseal(self, dirs: SessionDirs) -> None:
        """Before a CLI starts again in the folder of an agent that already ran there."""
        if self.sandboxes is not None:
            await asyncio.to_thread(self.sandboxes.reseal, dirs.root)

    def breach(self, dirs: SessionDirs, tenant: Tenant) -> Breach | None:
        """The limit the session in `dirs` hit so far (None: none, or no sandbox)."""
        if self.sandboxes is None:
            return None
        return self.sandboxes.breach(dirs.root, tenant.limits)

    async def release(self, session_id: str, dirs: SessionDirs) -> None:
        """Close the session's meter, kill what runs in its folder and remove it."""
        self._gateway.close_session(session_id)
        await self.folders.remove(dirs.root)

    def options(
        self,
        spec: SessionSpec,
        tenant: Tenant,
        dirs: SessionDirs,
        meter: SessionMeter,
        *,
        resume: str | None,
        budget: Decimal | None,
        max_turns: int,
        caller: CallerLoop | None = None,
    ) -> ClaudeAgentOptions:
        """The SDK options of one CLI start for `spec` (limits as given: what is left);
        `caller` brings the caller's tools and its hook on every tool call."""
        extra = {}
        if self.config.cli_max_retries is not None:
            extra["CLAUDE_CODE_MAX_RETRIES"] = str(self.config.cli_max_retries)
        if spec.pauses:
            # A request held while the session is paused at its budget must not time out
            # in the CLI first (its default: 10 minutes): the pause's own bound governs.
            extra["API_TIMEOUT_MS"] = str(int((spec.max_pause_s + PAUSED_REQUEST_MARGIN_S) * 1000))
        servers = cli_servers(
            session_servers(spec.tools, tenant.mcp_servers), self._gateway.base_url, meter.token
        )
        if servers.config:
            extra.update(servers.env)
            # The CLI waits for its servers before the first turn (not connecting them in
            # the background, which would leave their tools out of it), each at most this
            # long; the pump turns a server that failed into the session's error.
            extra["MCP_CONNECTION_NONBLOCKING"] = "false"
            extra["MCP_TIMEOUT"] = str(int(tenant.mcp_timeout_s * 1000))
        # The CLI talks to the metering gateway with a per-session token; the tenant's real
        # key stays in this process and is added by the gateway.
        env = cli_environment(
            dirs,
            base_url=self._gateway.base_url,
            api_key=meter.token,
            # A sandboxed CLI sees none of the server's environment in any case.
            scrub=() if self.sandboxes else self.config.scrub_env,
            extra=extra,
        )
        if self.sandboxes is not None:
            env.update(
                self.sandboxes.variables(
                    dirs.root,
                    [name for name, value in env.items() if value],
                    user=tenant.os_user or "agent",
                    ro_paths=servers.paths,
                )
            )
            cli = self.sandboxes.launcher
        else:
            cli = self._cli_for(tenant)
        caller_tools = caller.tool_names if caller is not None else []
        return ClaudeAgentOptions(
            # `tools` limits which built-in tools exist; `allowed_tools` lets those and the
            # MCP servers' (mcp__crm: all of crm's) run without a prompt (the caller's hook
            # decides first what needs its approval); any other MCP tool is refused.
            tools=[t for t in spec.tools if not t.startswith(MCP_PREFIX)],
            allowed_tools=[*spec.tools, *caller_tools],
            mcp_servers={**servers.config, **(caller.mcp_servers() if caller is not None else {})},
            # No MCP server but the session's: none from settings, plugins or .mcp.json.
            strict_mcp_config=True,
            hooks=caller.hooks() if caller is not None else None,
            can_use_tool=caller.can_use_tool if caller is not None else None,
            output_format=(
                {"type": "json_schema", "schema": spec.output_schema}
                if spec.output_schema is not None
                else None
            ),
            system_prompt=tenant.system_prompt,
            max_turns=max_turns,
            max_budget_usd=float(budget) if budget is not None else None,
            resume=resume,
            # Transcripts are mirrored to the database, so a resume works on any replica.
            session_store=cast(
                SessionStore,
                ChargedTranscripts(
                    self._store, tenant.name, lambda size: self._charged(meter.session_id, size)
                ),
            ),
            model=spec.model or None,
            effort=spec.effort or None,  # type: ignore[arg-type]  # validated: an EffortLevel
            max_thinking_tokens=spec.max_thinking_tokens or None,
            fallback_model=spec.fallback_model or None,
            include_partial_messages=spec.include_partial_messages,
            cwd=str(dirs.cwd),
            env=env,
            cli_path=str(cli),
            setting_sources=[],
            max_buffer_size=MAX_CLI_MESSAGE_BYTES,
            # A pipe of its own (the SDK pipes stderr only for a callback): the server's
            # stderr, its log, never reaches an agent.
            stderr=CliStderr(meter.session_id),
        )

    def _cli_for(self, tenant: Tenant) -> Path:
        """Unsandboxed: the CLI, or for a tenant with an os_user a launcher that becomes
        that user first (sandboxed, the sandbox's launcher does that).

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
                f'--init-groups -- {shlex.quote(str(self.config.cli_path))} "$@"\n'
            )
            tmp.chmod(0o755)
            tmp.replace(launcher)
        return launcher
