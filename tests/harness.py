"""Test harness: a real agentplane server on loopback with the sandbox model beside it.

Real parts everywhere (grpc.aio over a loopback socket, the generated stubs, SQLite or
PostgreSQL, the bundled CLI); the sandbox model is the one double.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import psycopg
from agentplane.server.app import App
from agentplane.server.config import Settings
from agentplane.server.model_double import SandboxServer
from agentplane.server.telemetry.setup import Telemetry
from agentplane.server.tenants import TenantRegistry, hash_token
from agentplane.v1 import budget_pb2_grpc, session_pb2, session_pb2_grpc, usage_pb2_grpc
from sqlalchemy.engine import make_url

TEST_PG_URL = os.environ.get("AGENTPLANE_TEST_DATABASE_URL", "").strip()
MODEL = "claude-sonnet-4-5"

TOKENS = {
    "acme": "acme-secret-token-1",
    "globex": "globex-secret-token-2",
    "small": "small-tok-3",
    "ops": "ops-token-4",
    "nokey": "nokey-token-5",
    "ten": "ten-token-6",
    "loop": "loop-token-7",
    "files": "files-token-8",
}


def short_dir(prefix: str = "ap") -> Path:
    """A folder with a short path (the CLI's socket path limit)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


TomlValue = str | int | float | bool | Path | Sequence[str]


def toml_value(value: TomlValue) -> str:
    """`value` written as TOML (a string, number, boolean or list of strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    return "[" + ", ".join(json.dumps(v) for v in value) + "]"


def tenant_toml(name: str, token: str | None = None, **settings: TomlValue) -> str:
    """One `[tenants.NAME]` table: `token_sha256` holds the hash of `token` when one is
    given, then `settings` in their order (a test may give `token_sha256` itself)."""
    if token is not None:
        settings = {"token_sha256": [hash_token(token)], **settings}
    lines = [f"[tenants.{name}]", *(f"{k} = {toml_value(v)}" for k, v in settings.items())]
    return "".join(f"{line}\n" for line in lines)


def write_tenants(folder: Path, *tables: str) -> Path:
    """Write `tables` (from `tenant_toml`, or any TOML text) as `folder/tenants.toml`; its path."""
    path = folder / "tenants.toml"
    path.write_text("\n".join(tables))
    return path


def tenants_toml(workspace: Path) -> str:
    """The harness's tenants (TOKENS names them), `acme` with `workspace` as its template."""
    key = "AGENTPLANE_TEST_ACME_KEY"
    return "\n".join(
        [
            tenant_toml(
                "acme",
                TOKENS["acme"],
                anthropic_api_key_env=key,
                allowed_tools=["Read", "Glob", "Grep"],
                system_prompt="You are acme's assistant.",
                daily_limit_usd=50.0,
                max_session_budget_usd=1.0,
                max_turns=8,
                max_concurrent_sessions=4,
                workspace_template=workspace,
            ),
            tenant_toml(
                "globex",
                TOKENS["globex"],
                anthropic_api_key_env="AGENTPLANE_TEST_GLOBEX_KEY",
                allowed_tools=["Read"],
                daily_limit_usd=10.0,
                max_session_budget_usd=0.5,
                max_turns=4,
                max_concurrent_sessions=2,
            ),
            tenant_toml(
                "small",
                TOKENS["small"],
                anthropic_api_key_env=key,
                allowed_tools=["Read"],
                daily_limit_usd=1.0,
                max_session_budget_usd=0.6,
                max_turns=4,
            ),
            tenant_toml(
                "ops",
                TOKENS["ops"],
                anthropic_api_key_env=key,
                allowed_tools=["Bash", "Glob"],
                daily_limit_usd=500.0,
                max_session_budget_usd=1.0,
                max_turns=6,
                max_concurrent_sessions=8,
            ),
            tenant_toml(
                "nokey",
                TOKENS["nokey"],
                anthropic_api_key_env="AGENTPLANE_TEST_UNSET_KEY",
                allowed_tools=["Read"],
            ),
            # Its caller in the loop: Write always needs the caller's approval.
            tenant_toml(
                "loop",
                TOKENS["loop"],
                anthropic_api_key_env=key,
                allowed_tools=["Bash", "Glob", "Read", "Write", "AskUserQuestion"],
                require_approval=["Write"],
                daily_limit_usd=100.0,
                max_session_budget_usd=1.0,
                max_turns=8,
                max_concurrent_sessions=8,
                max_answer_timeout_s=600,
            ),
            # Small file limits; its sessions are kept one day.
            tenant_toml(
                "files",
                TOKENS["files"],
                anthropic_api_key_env=key,
                allowed_tools=["Bash", "Glob", "Read"],
                daily_limit_usd=100.0,
                max_session_budget_usd=1.0,
                max_turns=6,
                max_input_files=3,
                max_input_file_mib=1,
                max_input_total_mib=2,
                max_artifacts=3,
                max_artifact_mib=1,
                max_artifacts_total_mib=2,
                retention_days=1,
            ),
            # A day that admits exactly ten sessions of 0.1 USD.
            tenant_toml(
                "ten",
                TOKENS["ten"],
                anthropic_api_key_env=key,
                allowed_tools=["Glob"],
                daily_limit_usd=1.0,
                max_session_budget_usd=0.1,
                max_concurrent_sessions=50,
                max_turns=20,
            ),
        ]
    )


class PostgresDatabase:
    """A fresh database on the test PostgreSQL server, dropped afterwards."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url).set(drivername="postgresql")
        self.name = f"ap_{uuid.uuid4().hex[:12]}"
        self.url = self.admin_url.set(database=self.name).render_as_string(hide_password=False)

    def _admin(self) -> psycopg.Connection[Any]:
        url = self.admin_url
        return psycopg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            autocommit=True,
        )

    def create(self) -> str:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return self.url

    def drop(self) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@dataclass
class Harness:
    """One server, its sandbox model and stubs."""

    app: App
    sandbox: SandboxServer
    channel: grpc.aio.Channel
    database_url: str
    work_dir: Path
    workspace: Path
    sessions: session_pb2_grpc.SessionServiceStub = field(init=False)
    budgets: budget_pb2_grpc.BudgetServiceStub = field(init=False)
    usage: usage_pb2_grpc.UsageServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = session_pb2_grpc.SessionServiceStub(self.channel)
        self.budgets = budget_pb2_grpc.BudgetServiceStub(self.channel)
        self.usage = usage_pb2_grpc.UsageServiceStub(self.channel)

    @staticmethod
    def auth(tenant: str = "acme") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {TOKENS[tenant]}"),)

    async def run(self, tenant: str = "acme", **fields: Any) -> list[session_pb2.SessionEvent]:
        """RunSession to the end; the events received."""
        fields.setdefault("model", MODEL)
        call = self.sessions.RunSession(
            session_pb2.RunSessionRequest(**fields), metadata=self.auth(tenant)
        )
        return [event async for event in call]


async def start_harness(
    database_url: str,
    *,
    extra_tenants: str = "",
    telemetry: Telemetry | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    **settings: Any,
) -> Harness:
    """A server on a free loopback port with the harness's tenants (and `extra_tenants`),
    `settings` over the test defaults; its channel uses `credentials` (None: plaintext)."""
    work = short_dir()
    workspace = work / "tpl"
    workspace.mkdir()
    (workspace / "hello.txt").write_text("The magic word is PAPAYA.\n")
    tenants_file = write_tenants(work, tenants_toml(workspace), textwrap.dedent(extra_tenants))
    os.environ["AGENTPLANE_TEST_ACME_KEY"] = "sk-ant-test-acme-key"
    os.environ["AGENTPLANE_TEST_GLOBEX_KEY"] = "sk-ant-test-globex-key"
    sandbox = SandboxServer()
    await sandbox.start()
    base = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        tenants_file=tenants_file,
        anthropic_base_url=sandbox.base_url,
        work_dir=work / "w",
        cli_max_retries=0,
        retry_base_delay_s=0.05,
        max_sessions=16,
        auto_migrate=True,
    )
    app = await App.start(replace(base, **settings), TenantRegistry.load(tenants_file), telemetry)
    await app.ready()
    address = f"127.0.0.1:{app.port}"
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    return Harness(app, sandbox, channel, database_url, work, workspace)


async def stop_harness(h: Harness) -> None:
    await h.channel.close()
    await h.app.stop(grace=1)
    await h.sandbox.stop()
    leftover = agent_processes(h.work_dir)
    shutil.rmtree(h.work_dir, ignore_errors=True)
    assert leftover == [], f"agent processes outlived their server: {leftover}"


async def collect(call: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in call]


def rich_status(err: grpc.aio.AioRpcError) -> Any:
    """The google.rpc.Status carried in an error's trailing metadata (or None)."""
    from google.rpc import status_pb2

    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


def error_details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The ErrorInfo / BadRequest / QuotaFailure / RetryInfo of an error, by type name."""
    from google.rpc import error_details_pb2

    status = rich_status(err)
    found: dict[str, Any] = {}
    for detail in status.details if status else ():
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                found[cls.__name__] = msg
    return found


@dataclass(frozen=True)
class Process:
    """One entry of the process table, as /proc shows it."""

    pid: int
    ppid: int
    cmdline: bytes  # NUL-separated arguments
    environ: bytes  # NUL-separated NAME=value entries; empty when not ours to read

    @property
    def env(self) -> list[bytes]:
        """The NAME=value entries of its environment."""
        return self.environ.split(b"\0")


def processes(under: Path | None = None) -> list[Process]:
    """One scan of the process table: every process whose stat and command line could be
    read or, with `under`, only the agent processes (CLIs and their tools) whose private
    folders lie under `under`.

    Every process of a session inherits its AGENTPLANE_SESSION_DIR; matching on it keeps
    this exact when other servers run agents on the same machine.
    """
    marker = f"AGENTPLANE_SESSION_DIR={under}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            environ = b""
        process = Process(int(entry.name), int(stat.rsplit(")", 1)[1].split()[1]), cmdline, environ)
        if under is None or any(v.startswith(marker) for v in process.env):
            found.append(process)
    return found


def agent_processes(under: Path) -> list[int]:
    """Pids of agent processes whose private folders lie under `under` (see `processes`)."""
    return [p.pid for p in processes(under)]
