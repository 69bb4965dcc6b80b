"""The tenants file, declared: every key of a `[tenants.<name>]` table once (`TENANT`), with
its parser, default and meaning, and the rules across keys; `parse_file` reads a file into
Tenants, naming the first bad key as `check-config` shows it, and `tenant_keys_table` is the
docs' table of the keys.
"""

from __future__ import annotations

import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..approvals import parse_rule
from ..certs import canonical_subject
from ..domain import OnBudgetExhausted, usd
from ..errors import ConfigError
from ..mcp.servers import PREFIX as MCP_PREFIX
from ..mcp.servers import parse_servers, tool_server
from ..sandbox.limits import SessionLimits
from ..toml_schema import Key, Rule, Table, bounded, count, mib, positive_int, strings, text
from . import policy
from .policy import EventLimits, FileLimits, Tenant
from .webhooks import parse_webhooks

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
WHERE = "AGENTPLANE_TENANTS_FILE"


# -- parsers: the TOML value -> the value, or ValueError(the reason) ------------------------


def _token_hashes(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError("must be a list of hex SHA-256 strings")
    if any(not _SHA256.match(t.lower()) for t in value):
        raise ValueError("entries must be 64 hex chars (use `agentplane-server hash-token`)")
    return frozenset(t.lower() for t in value)


def _subjects(value: Any) -> frozenset[str]:
    names = strings('distinguished names such as "CN=billing,O=Acme"')(value)
    return frozenset(canonical_subject(name) for name in names)  # ValueError: its reason


def _tools(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise ValueError("must be a list of tool names")
    return tuple(value)


def _money(value: Any) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not amount.is_finite() or amount <= 0:
        raise ValueError(f"must be a positive amount, not {value!r}")
    return usd(amount)


def _time_zone(value: Any) -> str:
    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return str(value)


def _directory(value: Any) -> Path | None:
    template = text(value)
    if template is not None and not Path(template).is_dir():
        raise ValueError(f"{template} is not a directory")
    return Path(template).resolve() if template else None


def _os_user(value: Any) -> str | None:
    if value is None:
        return None
    try:
        entry = pwd.getpwnam(str(value))
    except KeyError:
        raise ValueError(f"no such Unix user {value!r}") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ValueError(f"{value!r} is root (uid or gid 0): an agent never runs as root")
    if os.geteuid() != 0:
        raise ValueError("running agents as another user needs a root server")
    return str(value)


def _key_file(value: Any) -> Path | None:
    if value is None:
        return None
    path = Path(str(value))
    try:
        content = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not content.strip():
        raise ValueError(f"{path} is empty")
    return path.resolve()


def _approval_rules(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise ValueError("must be a list of tool names or patterns")
    for rule in value:
        try:
            parse_rule(rule)
        except ValueError as exc:
            raise ValueError(f"{rule!r}: {exc}") from None
    return tuple(value)


def _efforts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(e in policy.EFFORTS for e in value):
        raise ValueError(f"must be a list of {', '.join(policy.EFFORTS)}")
    return tuple(dict.fromkeys(value))


def _thinking_tokens(value: Any) -> int:
    tokens = count(value)
    if 0 < tokens < policy.MIN_THINKING_TOKENS:
        raise ValueError(f"must be 0 (none) or at least {policy.MIN_THINKING_TOKENS}")
    return tokens


def _model(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 128:
        raise ValueError(f"must be a model name (a string), not {value!r}")
    return value.strip()


def _models(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(m, str) and m.strip() and len(m) <= 128 for m in value
    ):
        raise ValueError("must be a list of model names")
    return tuple(dict.fromkeys(m.strip() for m in value))


def _seconds(value: Any) -> float:
    return float(positive_int(value))


def _on_budget_exhausted(value: Any) -> OnBudgetExhausted:
    if value not in tuple(OnBudgetExhausted):
        raise ValueError(f'must be "END" or "PAUSE", not {value!r}')
    return OnBudgetExhausted(value)


def _at_least(low: int, reason: str) -> Callable[[Any], int]:
    return bounded(positive_int, low, 1 << 62, f"must be at least {low} ({reason})")


# -- rules across keys: (values read so far, the raw table) -> the problem, or None ---------


def _credentials(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    if values["token_sha256"] or values["client_cert_sans"] or values["client_cert_subjects"]:
        return None
    return (
        "at least one token hash is required (or a client certificate: "
        "client_cert_sans, client_cert_subjects)"
    )


def _one_key_source(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    both = raw.get("anthropic_api_key_file") is not None and "anthropic_api_key_env" in raw
    return "set it or anthropic_api_key_env, not both" if both else None


def _session_budget(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    above = values["max_session_budget_usd"] > values["daily_limit_usd"]
    return "is above daily_limit_usd" if above else None


def _answer_timeout(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    above = values["answer_timeout_s"] > values["max_answer_timeout_s"]
    return "is above max_answer_timeout_s" if above else None


def _warm_without_caller(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    # A warm agent starts before its request is known, without the caller's loop.
    loop = values["require_approval"] or "AskUserQuestion" in values["allowed_tools"]
    if values["warm_pool_size"] and loop:
        return (
            "cannot be combined with require_approval "
            "or with AskUserQuestion in allowed_tools (the caller's loop)"
        )
    return None


def _declared_servers(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    declared = {server.name for server in values["mcp_servers"]}
    for tool in values["allowed_tools"]:
        server = tool_server(tool)
        if tool.startswith(MCP_PREFIX) and server not in declared:
            return f"{tool}: no MCP server {server!r} is declared in mcp_servers"
    return None


CREDENTIALS = Rule("token_sha256", _credentials)

# The keys of a [tenants.<name>] table, in the order they are checked (and documented).
TENANT = Table(
    (
        Key(
            "token_sha256",
            _token_hashes,
            [],
            "hex SHA-256 of each caller token (`agentplane-server hash-token`); one of the "
            "three credentials is required",
        ),
        Key(
            "client_cert_sans",
            lambda v: frozenset(strings("subject alternative names (DNS names, URIs, ...)")(v)),
            [],
            "with mTLS: client certificate subject alternative names (DNS, URI, e-mail, IP) "
            "that authenticate as this tenant",
        ),
        Key(
            "client_cert_subjects",
            _subjects,
            [],
            'with mTLS: client certificate subjects, e.g. `"CN=billing,O=Acme"` (attribute '
            "order, spaces, name case ignored)",
        ),
        CREDENTIALS,
        Key(
            "anthropic_api_key_env",
            lambda v: str(text(v)),
            "ANTHROPIC_API_KEY",
            "the environment variable holding the tenant's Anthropic API key (the key itself "
            "never leaves the server)",
            shown="`ANTHROPIC_API_KEY`",
        ),
        Rule("anthropic_api_key_file", _one_key_source),
        Key(
            "anthropic_api_key_file",
            _key_file,
            None,
            "or: a file holding the key, read per session (not with `anthropic_api_key_env`)",
            shown="unset",
        ),
        Key(
            "allowed_tools",
            _tools,
            ["Read", "Glob", "Grep"],
            "the only tools its agents have: built-in tools of the agent CLI, "
            "`WebSearch`/`WebFetch` ([money.md](money.md#tools-that-cost-more-than-tokens)), "
            "`mcp__<server>` or `mcp__<server>__<tool>`",
        ),
        Key(
            "system_prompt",
            lambda v: text(v, empty=True),
            None,
            "the agents' system prompt",
            shown="unset (empty)",
        ),
        Key(
            "daily_limit_usd",
            _money,
            "10",
            "the budget window: what the tenant may spend per day",
            shown="`10`",
        ),
        Key(
            "max_session_budget_usd",
            _money,
            "1",
            "default and maximum budget per session (at most `daily_limit_usd`)",
            shown="`1`",
        ),
        Rule("max_session_budget_usd", _session_budget),
        Key("max_turns", positive_int, 20, "default and maximum turns per session"),
        Key("max_concurrent_sessions", positive_int, 4, "sessions at once, across replicas"),
        Key(
            "timezone",
            _time_zone,
            "UTC",
            "the budget window's day (IANA name)",
            to="time_zone",
            shown="`UTC`",
        ),
        Key(
            "workspace_template",
            _directory,
            None,
            "a folder copied into each session's working directory",
            shown="unset",
        ),
        Key("max_duration_s", _seconds, 3600, "a session running longer ends ERROR/TIMEOUT"),
        Key(
            "os_user",
            _os_user,
            None,
            "run the tenant's agents as this Unix user (never root; needs a root server)",
            shown="unset",
        ),
        Key(
            "warm_pool_size",
            count,
            0,
            "agents kept started ahead of demand ([sessions.md](sessions.md#the-warm-pool))",
            shown="`0` (off)",
        ),
        Key(
            "warm_pool_model",
            _model,
            "",
            "the model warm agents start with",
            shown="the CLI's",
        ),
        Key(
            "max_memory_mib",
            _at_least(256, "the agent CLI alone needs ~200 MiB"),
            SessionLimits.memory_mib,
            "per session, files in its folder included (at least 256)",
            to="limits.memory_mib",
        ),
        Key(
            "max_processes",
            _at_least(32, "the agent CLI alone runs ~20 threads"),
            SessionLimits.processes,
            "processes and threads at once, per session (at least 32)",
            to="limits.processes",
        ),
        Key(
            "max_cpu_s",
            positive_int,
            SessionLimits.cpu_s,
            "CPU seconds of all its processes, per session",
            to="limits.cpu_s",
        ),
        Key(
            "max_disk_mib",
            positive_int,
            SessionLimits.disk_mib,
            "its folder and `/tmp`, per session",
            to="limits.disk_mib",
        ),
        Key(
            "require_approval",
            _approval_rules,
            [],
            "tool calls the caller must approve: `Write`, `Bash(git push:*)`, ... "
            "([api.md](api.md#callers-in-the-loop-caller-tools-approvals-questions)); "
            "not with `warm_pool_size`",
        ),
        Rule("warm_pool_size", _warm_without_caller),
        Key(
            "answer_timeout_s",
            _seconds,
            300,
            "how long a session waits for its caller's answer",
        ),
        Key(
            "max_answer_timeout_s",
            _seconds,
            3600,
            "the most a request may ask for",
        ),
        Rule("answer_timeout_s", _answer_timeout),
        Key(
            "max_input_files",
            positive_int,
            FileLimits.max_input_files,
            "input files per request",
            to="files.max_input_files",
        ),
        Key(
            "max_input_file_mib",
            mib(positive_int),
            FileLimits.max_input_file_bytes >> 20,
            "per input file",
            to="files.max_input_file_bytes",
        ),
        Key(
            "max_input_total_mib",
            mib(
                bounded(
                    positive_int,
                    1,
                    policy.MAX_INPUT_TOTAL_BYTES >> 20,
                    f"must be at most {policy.MAX_INPUT_TOTAL_BYTES >> 20} "
                    "(the largest request the server takes)",
                )
            ),
            FileLimits.max_input_total_bytes >> 20,
            f"all input files of a request (at most {policy.MAX_INPUT_TOTAL_BYTES >> 20})",
            to="files.max_input_total_bytes",
        ),
        Key(
            "max_artifacts",
            positive_int,
            FileLimits.max_artifacts,
            "files kept of an ended session's workspace",
            to="files.max_artifacts",
        ),
        Key(
            "max_artifact_mib",
            mib(positive_int),
            FileLimits.max_artifact_bytes >> 20,
            "per kept file",
            to="files.max_artifact_bytes",
        ),
        Key(
            "max_artifacts_total_mib",
            mib(positive_int),
            FileLimits.max_artifacts_total_bytes >> 20,
            "all kept files of a session",
            to="files.max_artifacts_total_bytes",
        ),
        Key(
            "max_events",
            _at_least(policy.MIN_EVENTS, "a session needs a few to say anything"),
            EventLimits.max_events,
            f"events one session may store, its result included (at least {policy.MIN_EVENTS})",
            to="events.max_events",
        ),
        Key(
            "max_events_mib",
            mib(positive_int),
            EventLimits.max_bytes >> 20,
            "bytes of its events and transcript entries",
            to="events.max_bytes",
        ),
        Key(
            "retention_days",
            count,
            0,
            "ended sessions older than this are deleted",
            shown="`0` (never)",
        ),
        Key(
            "allowed_efforts",
            _efforts,
            [],
            "efforts a request may ask for: " + ", ".join(f"`{e}`" for e in policy.EFFORTS),
            shown="`[]` (none)",
        ),
        Key(
            "max_thinking_tokens",
            _thinking_tokens,
            0,
            "the largest thinking budget a request may ask for "
            f"(0, or at least {policy.MIN_THINKING_TOKENS})",
            shown="`0` (none)",
        ),
        Key("fallback_models", _models, [], "fallback models a request may name"),
        Key(
            "mcp_servers",
            lambda value, where, _: parse_servers(value, where),
            {},
            "the tenant's MCP servers ([below](#tenant-mcp-servers))",
            nested=True,
            shown="none",
        ),
        Rule("allowed_tools", _declared_servers),
        Key(
            "mcp_timeout_s",
            _seconds,
            30,
            "how long each MCP server has to start and answer",
        ),
        Key(
            "max_server_tool_uses_per_request",
            bounded(
                positive_int,
                1,
                policy.MAX_SERVER_TOOL_USES,
                f"must be at most {policy.MAX_SERVER_TOOL_USES}",
            ),
            8,
            f"web searches (fetches) per model request, 1-{policy.MAX_SERVER_TOOL_USES}",
        ),
        Key(
            "on_budget_exhausted",
            _on_budget_exhausted,
            "END",
            'at its budget a session ends, or (`"PAUSE"`) waits for a raise '
            "([money.md](money.md#pausing-at-the-budget)); a request may say otherwise",
        ),
        Key(
            "max_pause_s",
            _seconds,
            3600,
            "how long a paused session waits for a raise, then ends ERROR/BUDGET_EXCEEDED",
        ),
        Key(
            "webhooks",
            lambda value, where, _: parse_webhooks(value, where),
            None,
            "receivers told of session ends, waits and budget thresholds "
            "([webhooks.md](webhooks.md))",
            nested=True,
            shown="none",
        ),
    )
)
# Dev mode's one tenant has no credentials: the server takes every caller as it.
_DEV = Table(tuple(entry for entry in TENANT.entries if entry is not CREDENTIALS))
_GROUPS = {"limits": SessionLimits, "files": FileLimits, "events": EventLimits}


def parse_tenant(name: str, raw: Mapping[str, Any], where: str, table: Table = TENANT) -> Tenant:
    """The Tenant of one `[tenants.<name>]` table; ConfigError naming the first bad key."""
    setting = f"{where} tenants.{name}"
    if not _NAME.match(name):
        raise ConfigError(setting, "tenant names are 1-63 chars of [a-z0-9_-]")
    values = table.read(raw, setting)
    return Tenant(name=name, **table.build(values, _GROUPS))


def dev_tenant() -> Tenant:
    """The single tenant of dev mode (no tenants file, no auth)."""
    return parse_tenant(policy.DEFAULT_TENANT, {}, "(dev mode)", _DEV)


def parse_file(text: str, path: Path) -> list[Tenant]:
    """The tenants of `text`, the contents of the tenants file `path`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(WHERE, f"{path} is not valid TOML: {exc}") from None
    tenants = data.get("tenants")
    if not isinstance(tenants, dict) or not tenants:
        raise ConfigError(WHERE, f"{path} defines no [tenants.<name>] table")
    for name, raw in tenants.items():
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: tenants.{name}", "must be a table")
    return [parse_tenant(name, raw, f"{path}:") for name, raw in tenants.items()]


def tenant_keys_table() -> str:
    """The docs' table of a tenant's keys (docs/tenants.md; a test keeps it in step)."""
    return TENANT.reference("")
