"""Configuration: every bad setting fails start-up with one line naming it, exit code 2."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agentplane.server.builtin_tools import BUILTIN_TOOLS, PROMPT_ONLY_TOOLS, closest_tool
from agentplane.server.config import (
    MAX_WORK_DIR_BYTES,
    SETTINGS,
    Settings,
    is_loopback,
    settings_table,
)
from agentplane.server.config_warnings import unknown_variables
from agentplane.server.errors import ConfigError, Unauthenticated
from agentplane.server.sandbox.cli_env import SessionDirs
from agentplane.server.tenants import TenantRegistry, hash_token
from harness import tenant_toml, write_tenants
from test_warm_pool import twin_tenants

GOOD_HASH = hash_token("tok")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"AGENTPLANE_LISTEN": "nonsense"}, "AGENTPLANE_LISTEN"),
        ({"AGENTPLANE_LISTEN": "127.0.0.1:99999"}, "AGENTPLANE_LISTEN"),
        ({"AGENTPLANE_DATABASE_URL": "mysql://x/y"}, "AGENTPLANE_DATABASE_URL"),
        ({"AGENTPLANE_DATABASE_URL": "::::"}, "AGENTPLANE_DATABASE_URL"),
        ({"AGENTPLANE_TENANTS_FILE": "/no/such/file.toml"}, "AGENTPLANE_TENANTS_FILE"),
        ({"ANTHROPIC_BASE_URL": "ftp://x"}, "ANTHROPIC_BASE_URL"),
        ({"AGENTPLANE_WORK_DIR": "/tmp/" + "x" * 60}, "AGENTPLANE_WORK_DIR"),
        ({"AGENTPLANE_CLI_MAX_RETRIES": "-1"}, "AGENTPLANE_CLI_MAX_RETRIES"),
        ({"AGENTPLANE_AUTO_MIGRATE": "maybe"}, "AGENTPLANE_AUTO_MIGRATE"),
        ({"AGENTPLANE_LOG_LEVEL": "LOUD"}, "AGENTPLANE_LOG_LEVEL"),
        ({"AGENTPLANE_SANDBOX": "off"}, "AGENTPLANE_SANDBOX"),
        ({"AGENTPLANE_DB_POOL_SIZE": "0"}, "AGENTPLANE_DB_POOL_SIZE"),  # 0: no limit at all
        ({"AGENTPLANE_DB_POOL_OVERFLOW": "-1"}, "AGENTPLANE_DB_POOL_OVERFLOW"),
        ({"AGENTPLANE_DB_WRITE_POOL_SIZE": "0"}, "AGENTPLANE_DB_WRITE_POOL_SIZE"),
        ({"AGENTPLANE_DB_WRITE_POOL_OVERFLOW": "x"}, "AGENTPLANE_DB_WRITE_POOL_OVERFLOW"),
        ({"AGENTPLANE_DB_IDLE_TIMEOUT_S": "0"}, "AGENTPLANE_DB_IDLE_TIMEOUT_S"),
        ({"AGENTPLANE_DATABASE_LISTEN_URL": "::::"}, "AGENTPLANE_DATABASE_LISTEN_URL"),
        (
            {
                "AGENTPLANE_DATABASE_URL": "postgresql://h/db",
                "AGENTPLANE_DATABASE_LISTEN_URL": "sqlite:///x.db",
            },
            "AGENTPLANE_DATABASE_LISTEN_URL",
        ),
        # A LISTEN URL beside SQLite: there is no LISTEN (nor a pooler) there.
        ({"AGENTPLANE_DATABASE_LISTEN_URL": "postgresql://h/db"}, "AGENTPLANE_DATABASE_LISTEN_URL"),
        ({"AGENTPLANE_SANDBOX_UIDS": "3000000"}, "AGENTPLANE_SANDBOX_UIDS"),
        ({"AGENTPLANE_SANDBOX_UIDS": "0-65535"}, "AGENTPLANE_SANDBOX_UIDS"),  # root in it
        ({"AGENTPLANE_SANDBOX_UIDS": "5000-4000"}, "AGENTPLANE_SANDBOX_UIDS"),
        ({"AGENTPLANE_SANDBOX_UIDS": "-1-5"}, "AGENTPLANE_SANDBOX_UIDS"),
    ],
)
def test_each_bad_setting_is_named(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.setting == setting
    assert setting in str(caught.value)


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.listen == "127.0.0.1:50051"
    assert s.database_url == "sqlite:///./agentplane.db"
    assert s.tenants_file is None and s.migrate_at_start
    assert not Settings.from_env({"AGENTPLANE_DATABASE_URL": "postgresql://h/db"}).migrate_at_start
    # The dataclass defaults and the environment's come from the same declarations.
    assert Settings() == s
    assert not s.pooled and s.direct_url == s.database_url
    pooled = Settings.from_env(
        {
            "AGENTPLANE_DATABASE_URL": "postgresql://u@pgbouncer:6432/db",
            "AGENTPLANE_DATABASE_LISTEN_URL": "postgresql://u@postgres:5432/db",
        }
    )
    assert pooled.pooled and pooled.direct_url == "postgresql://u@postgres:5432/db"


def test_a_too_long_work_dir_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="too long for the agent CLI's socket path"):
        Settings.from_env({"AGENTPLANE_WORK_DIR": "/tmp/" + "x" * (MAX_WORK_DIR_BYTES - 4)})
    ok = "/tmp/" + "x" * (MAX_WORK_DIR_BYTES - 5)
    assert Settings.from_env({"AGENTPLANE_WORK_DIR": ok}).work_dir == Path(ok)


def test_the_work_dir_limit_mirrors_the_cli_socket_limit() -> None:
    # config keeps a copy so that it does not import sessions; this keeps the copy honest.
    from agentplane.server.sandbox.cli_env import MAX_SOCKET_DIR_BYTES

    assert MAX_WORK_DIR_BYTES == MAX_SOCKET_DIR_BYTES // 2


def test_the_documented_settings_table_is_the_declared_one() -> None:
    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text().splitlines()
    start = page.index("| variable | default | meaning |")
    end = next((i for i in range(start, len(page)) if not page[i].startswith("|")), None)
    assert page[start:end] == settings_table().splitlines(), (
        "docs/configuration.md's settings table differs from server/config.py: paste the "
        "output of python -c "
        "'from agentplane.server.config import settings_table; print(settings_table())'"
    )


def test_config_and_telemetry_setup_do_not_import_each_other_or_sessions() -> None:
    probe = (
        "import sys\n"
        "import agentplane.server.config\n"
        "bad = [m for m in sys.modules if m.startswith(('agentplane.server.sessions',\n"
        "    'agentplane.server.telemetry.setup', 'opentelemetry.sdk'))]\n"
        "assert not bad, f'config imports {bad}'\n"
        "del sys.modules['agentplane.server.config']\n"
        "import agentplane.server.telemetry.setup\n"
        "assert 'agentplane.server.config' not in sys.modules, 'setup imports config'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (tenant_toml("a", allowed_tools=[]), "tenants.a.token_sha256"),
        (tenant_toml("a", token_sha256=["abc"]), "tenants.a.token_sha256"),
        (tenant_toml("a", "tok", daily_limit_usd=-1), "tenants.a.daily_limit_usd"),
        (tenant_toml("a", "tok", max_turns=0), "tenants.a.max_turns"),
        (tenant_toml("a", "tok", timezone="Mars/Base"), "tenants.a.timezone"),
        (tenant_toml("a", "tok", colour="red"), "tenants.a.colour"),
        # A string where one is meant: not turned into one (5 -> "5"), nor a crash.
        (tenant_toml("a", "tok", system_prompt=5), "tenants.a.system_prompt"),
        (tenant_toml("a", "tok", workspace_template=5), "tenants.a.workspace_template"),
        (tenant_toml("a", "tok", anthropic_api_key_env=5), "tenants.a.anthropic_api_key_env"),
        (tenant_toml("a", "tok", anthropic_api_key_env=""), "tenants.a.anthropic_api_key_env"),
        (
            tenant_toml("a", "tok", daily_limit_usd=1, max_session_budget_usd=2),
            "tenants.a.max_session_budget_usd",
        ),
        (
            tenant_toml("a", "tok", anthropic_api_key_file="/no/such/key"),
            "tenants.a.anthropic_api_key_file",
        ),
        (
            tenant_toml("a", "tok", anthropic_api_key_file="/dev/null"),
            "tenants.a.anthropic_api_key_file",
        ),
        (
            tenant_toml(
                "a", "tok", anthropic_api_key_env="K", anthropic_api_key_file="/etc/hostname"
            ),
            "tenants.a.anthropic_api_key_file",
        ),
        (tenant_toml("a", "tok", max_memory_mib=100), "tenants.a.max_memory_mib"),
        (tenant_toml("a", "tok", max_processes=8), "tenants.a.max_processes"),
        (tenant_toml("a", "tok", max_cpu_s=0), "tenants.a.max_cpu_s"),
        (tenant_toml("a", "tok", max_disk_mib=True), "tenants.a.max_disk_mib"),
        (tenant_toml("a", "tok", os_user="root"), "tenants.a.os_user"),  # never root
        ("not toml at all [", "AGENTPLANE_TENANTS_FILE"),
        ("[other]\nx = 1\n", "AGENTPLANE_TENANTS_FILE"),
    ],
)
def test_bad_tenants_files_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TenantRegistry.load(write_tenants(tmp_path, body))
    assert key in str(caught.value)


def test_a_token_hash_shared_by_two_tenants_is_refused(tmp_path: Path) -> None:
    path = write_tenants(tmp_path, tenant_toml("a", "tok"), tenant_toml("b", "tok"))
    with pytest.raises(ConfigError, match="also listed"):
        TenantRegistry.load(path)


def test_tokens_authenticate_by_hash_only(tmp_path: Path) -> None:
    registry = TenantRegistry.load(
        write_tenants(tmp_path, tenant_toml("a", token_sha256=[GOOD_HASH.upper()]))
    )
    assert registry.authenticate("Bearer tok").name == "a"
    assert registry.authenticate("bearer  tok ").name == "a"
    for header in (None, "", "Bearer", "Bearer nope", "Basic tok", "tok"):
        with pytest.raises(Unauthenticated) as caught:
            registry.authenticate(header)
        assert "tok" not in str(caught.value).replace("token", "")
    assert hash_token("tok") == hashlib.sha256(b"tok").hexdigest()


def test_dev_mode_needs_no_token() -> None:
    registry = TenantRegistry.dev()
    assert registry.dev_mode and registry.authenticate(None).name == "default"


def _server(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    return subprocess.run(
        [sys.executable, "-m", "agentplane.server", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_bad_setting_stops_the_server_with_exit_code_2_and_one_line() -> None:
    proc = _server("serve", AGENTPLANE_LISTEN="no-port-here")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "AGENTPLANE_LISTEN" in lines[0]
    proc = _server("check-config", AGENTPLANE_WORK_DIR="/tmp/" + "x" * 60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "AGENTPLANE_WORK_DIR" in lines[0] and "socket path" in lines[0]


def test_a_bad_tenants_file_stops_the_server_with_exit_code_2(tmp_path: Path) -> None:
    path = write_tenants(tmp_path, tenant_toml("a", max_turns=3))
    proc = _server(
        "serve",
        AGENTPLANE_TENANTS_FILE=str(path),
        AGENTPLANE_DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
    )
    assert proc.returncode == 2
    assert "tenants.a.token_sha256" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_hash_token_check_config_and_migrate(tmp_path: Path) -> None:
    proc = _server("hash-token", "s3cret")
    assert proc.returncode == 0 and proc.stdout.strip() == hash_token("s3cret")
    path = write_tenants(tmp_path, tenant_toml("a", "tok"))
    proc = _server("check-config", AGENTPLANE_TENANTS_FILE=str(path))
    assert proc.returncode == 0 and "1 tenant" in proc.stdout
    db = tmp_path / "m.db"
    proc = _server("migrate", AGENTPLANE_DATABASE_URL=f"sqlite:///{db}")
    assert proc.returncode == 0, proc.stderr
    import sqlite3

    tables = {r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master")}
    assert {"sessions", "session_events", "budget_windows", "reservations", "tool_uses"} <= tables


def test_help_documents_every_setting() -> None:
    proc = _server("--help")
    assert proc.returncode == 0
    documented = [line.split()[0] for line in proc.stdout.split("environment:\n")[1].splitlines()]
    assert documented == [s.env for s in SETTINGS]


def test_warm_pool_settings_are_checked(tmp_path: Path) -> None:
    bad = write_tenants(
        tmp_path, twin_tenants(1).replace("warm_pool_size = 1", "warm_pool_size = -1")
    )
    with pytest.raises(ConfigError, match="warm_pool_size"):
        TenantRegistry.load(bad)
    write_tenants(
        tmp_path,
        twin_tenants(1).replace('warm_pool_model = "claude-sonnet-4-5"', "warm_pool_model = 4", 1),
    )
    with pytest.raises(ConfigError, match="warm_pool_model"):
        TenantRegistry.load(bad)
    with pytest.raises(ConfigError, match="AGENTPLANE_WARM_POOL_MIN_AVAILABLE_MIB"):
        Settings.from_env({"AGENTPLANE_WARM_POOL_MIN_AVAILABLE_MIB": "lots"})
    with pytest.raises(ConfigError, match="AGENTPLANE_WARM_POOL_MAX_AGE_S"):
        Settings.from_env({"AGENTPLANE_WARM_POOL_MAX_AGE_S": "0"})


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"require_approval": "Bash"}, "require_approval"),
        ({"require_approval": ["Bash(unclosed"]}, "require_approval"),
        ({"answer_timeout_s": 0}, "answer_timeout_s"),
        ({"answer_timeout_s": 100, "max_answer_timeout_s": 50}, "answer_timeout_s"),
        ({"require_approval": ["Bash"], "warm_pool_size": 1}, "warm_pool_size"),
        ({"allowed_tools": ["AskUserQuestion"], "warm_pool_size": 1}, "warm_pool_size"),
    ],
)
def test_the_callers_loop_settings_are_checked(
    tmp_path: Path, settings: dict[str, Any], setting: str
) -> None:
    path = write_tenants(tmp_path, tenant_toml("a", "tok", **settings))
    with pytest.raises(ConfigError, match=f"tenants.a.{setting}"):
        TenantRegistry.load(path)
    ok = write_tenants(
        tmp_path,
        tenant_toml(
            "a", "tok", require_approval=["Bash(git push:*)", "Write"], answer_timeout_s=30
        ),
    )
    tenant = TenantRegistry.load(ok).tenants["a"]
    assert tenant.require_approval == ("Bash(git push:*)", "Write")
    assert (tenant.answer_timeout_s, tenant.max_answer_timeout_s) == (30, 3600)


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"allowed_efforts": ["low", "huge"]}, "allowed_efforts"),
        ({"allowed_efforts": "low"}, "allowed_efforts"),
        ({"max_thinking_tokens": 100}, "max_thinking_tokens"),
        ({"max_thinking_tokens": -1}, "max_thinking_tokens"),
        ({"fallback_models": "claude-haiku-4-5"}, "fallback_models"),
        ({"fallback_models": [""]}, "fallback_models"),
    ],
)
def test_the_model_knob_settings_are_checked(
    tmp_path: Path, settings: dict[str, Any], setting: str
) -> None:
    path = write_tenants(tmp_path, tenant_toml("a", "tok", **settings))
    with pytest.raises(ConfigError, match=f"tenants.a.{setting}"):
        TenantRegistry.load(path)
    ok = write_tenants(
        tmp_path,
        tenant_toml(
            "a",
            "tok",
            allowed_efforts=["low", "max"],
            max_thinking_tokens=1024,
            fallback_models=["claude-haiku-4-5"],
        ),
    )
    tenant = TenantRegistry.load(ok).tenants["a"]
    assert (tenant.allowed_efforts, tenant.max_thinking_tokens, tenant.fallback_models) == (
        ("low", "max"),
        1024,
        ("claude-haiku-4-5",),
    )
    plain = TenantRegistry.load(write_tenants(tmp_path, tenant_toml("a", "tok"))).tenants["a"]
    assert (plain.allowed_efforts, plain.max_thinking_tokens, plain.fallback_models) == ((), 0, ())


@pytest.mark.parametrize(
    ("value", "problem"),
    [(0, "must be a positive integer"), ("8", "must be a positive integer"), (101, "at most 100")],
)
def test_max_server_tool_uses_per_request_is_checked(
    tmp_path: Path, value: Any, problem: str
) -> None:
    path = write_tenants(tmp_path, tenant_toml("a", "tok", max_server_tool_uses_per_request=value))
    with pytest.raises(ConfigError) as caught:
        TenantRegistry.load(path)
    assert "tenants.a.max_server_tool_uses_per_request" in str(caught.value)
    assert problem in str(caught.value)
    ok = write_tenants(tmp_path, tenant_toml("a", "tok", max_server_tool_uses_per_request=3))
    assert TenantRegistry.load(ok).tenants["a"].max_server_tool_uses_per_request == 3
    plain = TenantRegistry.load(write_tenants(tmp_path, tenant_toml("a", "tok"))).tenants["a"]
    assert plain.max_server_tool_uses_per_request == 8


@pytest.mark.parametrize(
    ("settings", "setting", "words"),
    [
        ({"max_events": 15}, "max_events", "at least 16"),
        ({"max_events": "many"}, "max_events", "positive integer"),
        ({"max_events_mib": 0}, "max_events_mib", "positive integer"),
        ({"max_events_mib": 1.5}, "max_events_mib", "positive integer"),
    ],
)
def test_the_event_limits_are_checked(
    tmp_path: Path, settings: dict[str, Any], setting: str, words: str
) -> None:
    path = write_tenants(tmp_path, tenant_toml("a", "tok", **settings))
    with pytest.raises(ConfigError, match=f"tenants.a.{setting}.*{words}"):
        TenantRegistry.load(path)
    ok = write_tenants(tmp_path, tenant_toml("a", "tok", max_events=500, max_events_mib=4))
    tenant = TenantRegistry.load(ok).tenants["a"]
    assert (tenant.events.max_events, tenant.events.max_bytes) == (500, 4 << 20)
    plain = TenantRegistry.load(write_tenants(tmp_path, tenant_toml("a", "tok"))).tenants["a"]
    # The defaults: well under 64 MiB stored per session.
    assert (plain.events.max_events, plain.events.max_bytes) == (20_000, 32 << 20)


def mcp_tenant(servers: str, tools: str = '["mcp__crm"]') -> str:
    return tenant_toml("a", "tok") + f"allowed_tools = {tools}\n" + servers


@pytest.mark.parametrize(
    ("body", "setting"),
    [
        (mcp_tenant("", tools='["mcp__crm"]'), "tenants.a.allowed_tools"),  # no such server
        (
            mcp_tenant('[tenants.a.mcp_servers.caller]\ncommand = "/bin/true"\n', '["Read"]'),
            "tenants.a.mcp_servers.caller",
        ),
        (
            mcp_tenant('[tenants.a.mcp_servers.a__b]\ncommand = "/bin/true"\n', '["Read"]'),
            "tenants.a.mcp_servers.a__b",
        ),
        (
            mcp_tenant('[tenants.a.mcp_servers.crm]\ncommand = "true"\n'),
            "tenants.a.mcp_servers.crm.command",
        ),
        (
            mcp_tenant(
                '[tenants.a.mcp_servers.crm]\ncommand = "/bin/true"\npaths = ["/no/such"]\n'
            ),
            "tenants.a.mcp_servers.crm.paths",
        ),
        (
            mcp_tenant('[tenants.a.mcp_servers.crm]\ncommand = "/bin/true"\npaths = ["/a b"]\n'),
            "tenants.a.mcp_servers.crm.paths",
        ),
        (
            mcp_tenant('[tenants.a.mcp_servers.crm]\ncommand = "/bin/true"\npaths = ["/"]\n'),
            "tenants.a.mcp_servers.crm.paths",
        ),
        (
            mcp_tenant(
                '[tenants.a.mcp_servers.crm]\ncommand = "/bin/true"\npaths = ["/usr/../etc"]\n'
            ),
            "tenants.a.mcp_servers.crm.paths",
        ),
        (
            mcp_tenant('[tenants.a.mcp_servers.crm]\ntype = "ws"\nurl = "http://x"\n'),
            "tenants.a.mcp_servers.crm.type",
        ),
        (
            mcp_tenant('[tenants.a.mcp_servers.crm]\ntype = "http"\nurl = "ftp://x/mcp"\n'),
            "tenants.a.mcp_servers.crm.url",
        ),
        (
            mcp_tenant('[tenants.a.mcp_servers.crm]\ntype = "http"\nurl = "https://u:p@x/mcp"\n'),
            "tenants.a.mcp_servers.crm.url",
        ),
        (
            mcp_tenant(
                '[tenants.a.mcp_servers.crm]\ntype = "http"\nurl = "https://x"\n'
                'command = "/bin/true"\n'
            ),
            "tenants.a.mcp_servers.crm.command",
        ),
        (
            mcp_tenant(
                '[tenants.a.mcp_servers.crm]\ntype = "http"\nurl = "https://x"\n'
                'headers = { Authorization = { env = "A", file = "/b" } }\n'
            ),
            "tenants.a.mcp_servers.crm.headers.Authorization",
        ),
        (
            mcp_tenant(
                '[tenants.a.mcp_servers.crm]\ntype = "http"\nurl = "https://x"\n'
                'headers = { "Bad Header" = "x" }\n'
            ),
            "tenants.a.mcp_servers.crm.headers",
        ),
        (
            mcp_tenant(
                '[tenants.a.mcp_servers.crm]\ntype = "sse"\nurl = "https://x"\n'
                'headers = { Authorization = { file = "relative" } }\n'
            ),
            "tenants.a.mcp_servers.crm.headers.Authorization",
        ),
        (tenant_toml("a", "tok", mcp_timeout_s=0), "tenants.a.mcp_timeout_s"),
    ],
)
def test_mcp_server_declarations_are_checked(tmp_path: Path, body: str, setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TenantRegistry.load(write_tenants(tmp_path, body))
    assert setting in str(caught.value)


def test_mcp_servers_parse_and_keep_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentplane.server.mcp.servers import RemoteServer, StdioServer, problem

    secret = tmp_path / "crm-token"
    secret.write_text("from-a-file\n")
    body = mcp_tenant(
        '[tenants.a.mcp_servers.crm]\ntype = "http"\nurl = "https://crm.example:8443/v1/mcp?x=1"\n'
        f'headers = {{ Authorization = {{ env = "CRM_TOKEN", prefix = "Bearer " }}, '
        f'X-Key = {{ file = "{secret}" }}, X-Team = "acme" }}\n'
        '[tenants.a.mcp_servers.files]\ncommand = "/bin/cat"\nenv = { MODE = "ro" }\n'
        'paths = ["/usr/share"]\n',
        tools='["Read", "mcp__crm__lookup", "mcp__files"]',
    )
    monkeypatch.delenv("CRM_TOKEN", raising=False)
    registry = TenantRegistry.load(write_tenants(tmp_path, body))
    crm, files = registry.tenants["a"].mcp_servers
    assert isinstance(crm, RemoteServer) and isinstance(files, StdioServer)
    assert (crm.origin, crm.path) == ("https://crm.example:8443", "/v1/mcp?x=1")
    assert "CRM_TOKEN" in registry.key_env_names()  # scrubbed from unsandboxed agents
    assert problem([crm]) == (
        "MCP server crm: header Authorization: the environment variable CRM_TOKEN is not set"
    )
    monkeypatch.setenv("CRM_TOKEN", "t0k")
    assert problem([crm, files]) is None
    assert [(k, v.resolve()) for k, v in crm.headers] == [
        ("Authorization", "Bearer t0k"),
        ("X-Key", "from-a-file"),
        ("X-Team", "acme"),
    ]
    assert "t0k" not in repr(registry.tenants["a"]) and "from-a-file" not in repr(crm)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("agentplane.example", False),  # a name may resolve anywhere
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_dev_mode_beyond_loopback_needs_the_explicit_opt_in() -> None:
    beyond = Settings.from_env({"AGENTPLANE_LISTEN": "[::]:50051"})
    assert beyond.listen_host == "::"
    with pytest.raises(ConfigError) as caught:
        beyond.check_exposure(dev_mode=True)
    assert caught.value.setting == "AGENTPLANE_TENANTS_FILE"
    assert "AGENTPLANE_ALLOW_UNAUTHENTICATED=1" in str(caught.value)
    beyond.check_exposure(dev_mode=False)  # a tenants file: callers authenticate
    Settings.from_env({"AGENTPLANE_LISTEN": "[::1]:50051"}).check_exposure(dev_mode=True)
    allowed = Settings.from_env(
        {"AGENTPLANE_LISTEN": "0.0.0.0:50051", "AGENTPLANE_ALLOW_UNAUTHENTICATED": "1"}
    )
    allowed.check_exposure(dev_mode=True)
    with pytest.raises(ConfigError, match="AGENTPLANE_ALLOW_UNAUTHENTICATED"):
        Settings.from_env({"AGENTPLANE_ALLOW_UNAUTHENTICATED": "yes"})


def test_unknown_agentplane_variables_are_named_with_the_closest_setting() -> None:
    env = {
        "AGENTPLANE_LISTENN": "x",
        "AGENTPLANE_DATABSE_URL": "x",
        "AGENTPLANE_ZZZ": "x",
        "AGENTPLANE_LISTEN": "x",  # known: a setting
        "AGENTPLANE_TARGET": "x",  # the client's
        "AGENTPLANE_TEST_DATABASE_URL": "x",  # the tests'
        "AGENTPLANE_ACME_KEY": "x",  # named by the tenants file
        "PATH": "x",
    }
    assert unknown_variables(env, {"AGENTPLANE_ACME_KEY"}) == [
        (
            "AGENTPLANE_DATABSE_URL is not an agentplane setting (ignored); did you mean "
            "AGENTPLANE_DATABASE_URL?"
        ),
        (
            "AGENTPLANE_LISTENN is not an agentplane setting (ignored); did you mean "
            "AGENTPLANE_LISTEN?"
        ),
        (
            "AGENTPLANE_ZZZ is not an agentplane setting (ignored); `agentplane-server --help` "
            "lists the settings"
        ),
    ]


async def test_the_builtin_tool_names_are_the_bundled_clis(session_dirs: SessionDirs) -> None:
    # The CLI drops a name it does not have: asked for all of ours and one it has not, it
    # offers exactly ours; asked for none, only tools among ours.
    from agentplane.server.model_double import SandboxServer
    from agentplane.server.sandbox.cli_env import NO_OUTBOUND_TRAFFIC
    from agentplane.server.sessions.agents.launcher import BUNDLED_CLI
    from claude_agent_sdk import ClaudeAgentOptions, SystemMessage, query

    model = SandboxServer()
    await model.start()
    env = {
        **NO_OUTBOUND_TRAFFIC,
        "ANTHROPIC_BASE_URL": model.base_url,
        "ANTHROPIC_API_KEY": "sandbox",
        "HOME": str(session_dirs.home),
        "CLAUDE_CONFIG_DIR": str(session_dirs.config),
        "CLAUDE_CODE_TMPDIR": str(session_dirs.tmp),
    }

    async def offered(tools: list[str] | None) -> set[str]:
        options = ClaudeAgentOptions(
            tools=tools,
            env=env,
            cwd=str(session_dirs.cwd),
            cli_path=str(BUNDLED_CLI),
            setting_sources=[],
            max_turns=1,
        )
        found: set[str] = set()
        async for message in query(prompt="hello", options=options):
            if isinstance(message, SystemMessage) and message.subtype == "init":
                found = set(message.data["tools"])
        return found

    try:
        asked = sorted(BUILTIN_TOOLS - PROMPT_ONLY_TOOLS)
        assert await offered([*asked, "Globb"]) == set(asked)
        assert await offered(None) <= BUILTIN_TOOLS
    finally:
        await model.stop()


def test_closest_tool_names_a_misspelled_one_only() -> None:
    assert closest_tool("Globb") == "Glob"
    assert closest_tool("bash") == "Bash"
    assert closest_tool("Frobnicate") is None
