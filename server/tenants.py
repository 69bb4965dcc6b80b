"""Tenants: who may call, with which tools, prompt and limits.

The tenants file (TOML) holds only hashes of caller tokens, the identities of client
certificates (mTLS) and the *name* of the environment variable with each tenant's
Anthropic API key, never a secret itself. A `TenantRegistry` is read whole and checked
before use; a live one takes a newer file's contents in one step (`replace`).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .approvals import parse_rule
from .certs import CertIdentity, canonical_subject
from .domain import usd
from .errors import ConfigError, Unauthenticated
from .mcp.servers import PREFIX as MCP_PREFIX
from .mcp.servers import McpServer, RemoteServer, parse_servers, tool_server
from .sandbox.limits import SessionLimits
from .webhooks.config import WebhookPolicy, parse_webhooks

DEFAULT_TENANT = "default"
# The SDK's effort levels (ClaudeAgentOptions.effort).
EFFORTS = ("low", "medium", "high", "xhigh", "max")
# The smallest thinking budget the Messages API takes.
MIN_THINKING_TOKENS = 1024
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The input files of one request travel in it: the gRPC server takes messages this large.
MAX_INPUT_TOTAL_BYTES = 64 << 20
# The largest max_server_tool_uses_per_request (the gateway reserves for every use).
MAX_SERVER_TOOL_USES = 100


def hash_token(token: str) -> str:
    """The hex SHA-256 of a caller token, as the tenants file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """One tenant's policy."""

    name: str
    token_sha256: frozenset[str]
    anthropic_api_key_env: str
    allowed_tools: tuple[str, ...]
    system_prompt: str | None
    daily_limit_usd: Decimal
    max_session_budget_usd: Decimal
    max_turns: int
    max_concurrent_sessions: int
    time_zone: str = "UTC"
    workspace_template: Path | None = None
    max_duration_s: float = 3600.0
    # Run this tenant's agent processes as this Unix user (the server must run as root).
    os_user: str | None = None
    # Agent processes kept started ahead of demand (0: none), for requests that leave
    # tools, turns and budget at the tenant's defaults and ask for `warm_pool_model`.
    warm_pool_size: int = 0
    warm_pool_model: str = ""
    # What each of the tenant's sessions may use (memory, processes, CPU time, disk).
    limits: SessionLimits = field(default_factory=SessionLimits)
    # A file holding the key, read when needed (in place of anthropic_api_key_env).
    anthropic_api_key_file: Path | None = None
    # Tools whose every call needs the caller's approval (names or patterns; see
    # approvals.py); a request may add rules, never remove these.
    require_approval: tuple[str, ...] = ()
    # How long a session waits for its caller's answer by default, and at most.
    answer_timeout_s: float = 300.0
    max_answer_timeout_s: float = 3600.0
    # What a request may bring into the workspace, and what an ended session keeps of it.
    files: FileLimits = field(default_factory=lambda: FileLimits())
    # Ended sessions older than this are deleted in the background (0: kept for ever).
    retention_days: int = 0
    # What each session may store of its event log (past it, it ends ERROR/EVENT_LIMIT).
    events: EventLimits = field(default_factory=lambda: EventLimits())
    # Client certificates (mTLS) that authenticate as this tenant: by a subject
    # alternative name, or by the subject (RFC 4514, canonical), each exactly.
    client_cert_sans: frozenset[str] = frozenset()
    client_cert_subjects: frozenset[str] = frozenset()

    @property
    def binds_certificates(self) -> bool:
        return bool(self.client_cert_sans or self.client_cert_subjects)

    # The model knobs a request may set (none by default): effort levels, the largest
    # thinking budget (0: none may be asked for) and the fallback models.
    allowed_efforts: tuple[str, ...] = ()
    max_thinking_tokens: int = 0
    fallback_models: tuple[str, ...] = ()
    # Its MCP servers (their tools are mcp__<server>__<tool>; allowed_tools says which the
    # agent has), and how long each has to start and answer the CLI's handshake.
    mcp_servers: tuple[McpServer, ...] = ()
    mcp_timeout_s: float = 30.0
    # The most uses a model request may have of each server tool it offers (a web
    # search's `max_uses`): the gateway caps it, sets it where missing and reserves for it.
    max_server_tool_uses_per_request: int = 8
    # Its webhooks: endpoints, callback URLs a request may name, retries (its `webhooks`
    # table; the default sends nothing).
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)

    def unix_ids(self) -> tuple[int, int] | None:
        """The uid and gid of the tenant's os_user (None: its agents run as the server)."""
        if self.os_user is None:
            return None
        entry = pwd.getpwnam(self.os_user)
        return entry.pw_uid, entry.pw_gid

    def api_key(self) -> str | None:
        """The tenant's Anthropic API key, read from its file or the environment when
        needed (so a rotated key is used from the next session on)."""
        if self.anthropic_api_key_file is not None:
            try:
                return self.anthropic_api_key_file.read_text().strip() or None
            except OSError:
                return None
        return os.environ.get(self.anthropic_api_key_env) or None


@dataclass(frozen=True)
class EventLimits:
    """What one session of a tenant may store of its event log: events (its `result`
    included) and their payloads' bytes (its `result` aside)."""

    max_events: int = 20_000
    max_bytes: int = 32 << 20


# The least a session needs to say anything (started, init, a turn, its result...).
MIN_EVENTS = 16


@dataclass(frozen=True)
class FileLimits:
    """A tenant's limits on input files and on the artifacts kept of its sessions."""

    max_input_files: int = 64
    max_input_file_bytes: int = 4 << 20
    max_input_total_bytes: int = 16 << 20
    max_artifacts: int = 100
    max_artifact_bytes: int = 8 << 20
    max_artifacts_total_bytes: int = 32 << 20


_DEFAULTS: Mapping[str, Any] = {
    "anthropic_api_key_env": "ANTHROPIC_API_KEY",
    "allowed_tools": ["Read", "Glob", "Grep"],
    "system_prompt": None,
    "daily_limit_usd": "10",
    "max_session_budget_usd": "1",
    "max_turns": 20,
    "max_concurrent_sessions": 4,
    "timezone": "UTC",
    "workspace_template": None,
    "max_duration_s": 3600,
    "os_user": None,
    "warm_pool_size": 0,
    "warm_pool_model": "",
    "anthropic_api_key_file": None,
    "max_memory_mib": SessionLimits.memory_mib,
    "max_processes": SessionLimits.processes,
    "max_cpu_s": SessionLimits.cpu_s,
    "max_disk_mib": SessionLimits.disk_mib,
    "require_approval": [],
    "answer_timeout_s": 300,
    "max_answer_timeout_s": 3600,
    "max_input_files": FileLimits.max_input_files,
    "max_input_file_mib": FileLimits.max_input_file_bytes >> 20,
    "max_input_total_mib": FileLimits.max_input_total_bytes >> 20,
    "max_artifacts": FileLimits.max_artifacts,
    "max_artifact_mib": FileLimits.max_artifact_bytes >> 20,
    "max_artifacts_total_mib": FileLimits.max_artifacts_total_bytes >> 20,
    "retention_days": 0,
    "max_events": EventLimits.max_events,
    "max_events_mib": EventLimits.max_bytes >> 20,
    "allowed_efforts": [],
    "max_thinking_tokens": 0,
    "fallback_models": [],
    "mcp_servers": {},
    "mcp_timeout_s": 30,
    "max_server_tool_uses_per_request": 8,
}
_KEYS = {"token_sha256", "client_cert_sans", "client_cert_subjects", "webhooks", *_DEFAULTS}


def dev_tenant() -> Tenant:
    """The single tenant of dev mode (no tenants file, no auth)."""
    return _parse_tenant(DEFAULT_TENANT, {}, where="(dev mode)", require_credentials=False)


def _money(value: Any, setting: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(setting, f"{value!r} is not a number") from None
    if not amount.is_finite() or amount <= 0:
        raise ConfigError(setting, f"must be a positive amount, not {value!r}")
    return usd(amount)


def _positive_int(value: Any, setting: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(setting, f"must be a positive integer, not {value!r}")
    return value


def _count(value: Any, setting: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(setting, f"must be an integer >= 0, not {value!r}")
    return value


def _model(value: Any, setting: str) -> str:
    if not isinstance(value, str) or len(value) > 128:
        raise ConfigError(setting, f"must be a model name (a string), not {value!r}")
    return value.strip()


def _text(value: Any, setting: str, *, empty: bool = False) -> str | None:
    """A string setting (None: unset): any other type is refused, not turned into text."""
    if value is not None and (not isinstance(value, str) or not (empty or value.strip())):
        raise ConfigError(
            setting, f"must be a {'' if empty else 'non-empty '}string, not {value!r}"
        )
    return value


def _strings(value: Any, setting: str, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(setting, f"must be a list of {what}")
    return [v.strip() for v in value]


def _parse_tenant(
    name: str, raw: Mapping[str, Any], *, where: str, require_credentials: bool
) -> Tenant:
    def key(k: str) -> str:
        return f"{where} tenants.{name}.{k}"

    if not _NAME.match(name):
        raise ConfigError(f"{where} tenants.{name}", "tenant names are 1-63 chars of [a-z0-9_-]")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(key(min(unknown)), "unknown setting")
    cfg = {**_DEFAULTS, **raw}
    tokens = raw.get("token_sha256", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConfigError(key("token_sha256"), "must be a list of hex SHA-256 strings")
    bad = [t for t in tokens if not _SHA256.match(t.lower())]
    if bad:
        raise ConfigError(
            key("token_sha256"),
            "entries must be 64 hex chars (use `agentplane-server hash-token`)",
        )
    sans = _strings(
        raw.get("client_cert_sans", []),
        key("client_cert_sans"),
        "subject alternative names (DNS names, URIs, ...)",
    )
    subjects = []
    for text in _strings(
        raw.get("client_cert_subjects", []),
        key("client_cert_subjects"),
        'distinguished names such as "CN=billing,O=Acme"',
    ):
        try:
            subjects.append(canonical_subject(text))
        except ValueError as exc:
            raise ConfigError(key("client_cert_subjects"), str(exc)) from None
    if require_credentials and not (tokens or sans or subjects):
        raise ConfigError(
            key("token_sha256"),
            "at least one token hash is required (or a client certificate: "
            "client_cert_sans, client_cert_subjects)",
        )
    tools = cfg["allowed_tools"]
    if not isinstance(tools, list) or not all(isinstance(t, str) and t for t in tools):
        raise ConfigError(key("allowed_tools"), "must be a list of tool names")
    servers = parse_servers(cfg["mcp_servers"], key("mcp_servers"))
    declared = {server.name for server in servers}
    for tool in tools:
        server = tool_server(tool)
        if tool.startswith(MCP_PREFIX) and server not in declared:
            raise ConfigError(
                key("allowed_tools"), f"{tool}: no MCP server {server!r} is declared in mcp_servers"
            )
    try:
        ZoneInfo(str(cfg["timezone"]))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(key("timezone"), f"unknown time zone {cfg['timezone']!r}") from None
    template = _text(cfg["workspace_template"], key("workspace_template"))
    if template is not None and not Path(template).is_dir():
        raise ConfigError(key("workspace_template"), f"{template} is not a directory")
    os_user = cfg["os_user"]
    if os_user is not None:
        try:
            entry = pwd.getpwnam(str(os_user))
        except KeyError:
            raise ConfigError(key("os_user"), f"no such Unix user {os_user!r}") from None
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise ConfigError(
                key("os_user"), f"{os_user!r} is root (uid or gid 0): an agent never runs as root"
            )
        if os.geteuid() != 0:
            raise ConfigError(key("os_user"), "running agents as another user needs a root server")
    key_file = cfg["anthropic_api_key_file"]
    if key_file is not None:
        if "anthropic_api_key_env" in raw:
            raise ConfigError(
                key("anthropic_api_key_file"), "set it or anthropic_api_key_env, not both"
            )
        key_file = Path(str(key_file))
        try:
            if not key_file.read_text().strip():
                raise ConfigError(key("anthropic_api_key_file"), f"{key_file} is empty")
        except OSError as exc:
            raise ConfigError(
                key("anthropic_api_key_file"), f"cannot read {key_file}: {exc.strerror}"
            ) from None
    limits = SessionLimits(
        memory_mib=_positive_int(cfg["max_memory_mib"], key("max_memory_mib")),
        processes=_positive_int(cfg["max_processes"], key("max_processes")),
        cpu_s=_positive_int(cfg["max_cpu_s"], key("max_cpu_s")),
        disk_mib=_positive_int(cfg["max_disk_mib"], key("max_disk_mib")),
    )
    if limits.memory_mib < 256:
        raise ConfigError(
            key("max_memory_mib"), "must be at least 256 (the agent CLI alone needs ~200 MiB)"
        )
    if limits.processes < 32:
        raise ConfigError(
            key("max_processes"), "must be at least 32 (the agent CLI alone runs ~20 threads)"
        )
    rules = cfg["require_approval"]
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise ConfigError(key("require_approval"), "must be a list of tool names or patterns")
    for rule in rules:
        try:
            parse_rule(rule)
        except ValueError as exc:
            raise ConfigError(key("require_approval"), f"{rule!r}: {exc}") from None
    answer_timeout = _positive_int(cfg["answer_timeout_s"], key("answer_timeout_s"))
    max_answer_timeout = _positive_int(cfg["max_answer_timeout_s"], key("max_answer_timeout_s"))
    if answer_timeout > max_answer_timeout:
        raise ConfigError(key("answer_timeout_s"), "is above max_answer_timeout_s")
    if cfg["warm_pool_size"] and (rules or "AskUserQuestion" in tools):
        # A warm agent starts before its request is known, without the caller's loop.
        raise ConfigError(
            key("warm_pool_size"),
            "cannot be combined with require_approval "
            "or with AskUserQuestion in allowed_tools (the caller's loop)",
        )
    files = FileLimits(
        **{
            name: _positive_int(cfg[setting], key(setting))
            << (20 if setting.endswith("_mib") else 0)
            for name, setting in (
                ("max_input_files", "max_input_files"),
                ("max_input_file_bytes", "max_input_file_mib"),
                ("max_input_total_bytes", "max_input_total_mib"),
                ("max_artifacts", "max_artifacts"),
                ("max_artifact_bytes", "max_artifact_mib"),
                ("max_artifacts_total_bytes", "max_artifacts_total_mib"),
            )
        }
    )
    if files.max_input_total_bytes > MAX_INPUT_TOTAL_BYTES:
        raise ConfigError(
            key("max_input_total_mib"),
            f"must be at most {MAX_INPUT_TOTAL_BYTES >> 20} (the largest request the server takes)",
        )
    events = EventLimits(
        _positive_int(cfg["max_events"], key("max_events")),
        _positive_int(cfg["max_events_mib"], key("max_events_mib")) << 20,
    )
    if events.max_events < MIN_EVENTS:
        raise ConfigError(
            key("max_events"),
            f"must be at least {MIN_EVENTS} (a session needs a few to say anything)",
        )
    efforts = cfg["allowed_efforts"]
    if not isinstance(efforts, list) or not all(e in EFFORTS for e in efforts):
        raise ConfigError(key("allowed_efforts"), f"must be a list of {', '.join(EFFORTS)}")
    thinking = _count(cfg["max_thinking_tokens"], key("max_thinking_tokens"))
    if 0 < thinking < MIN_THINKING_TOKENS:
        raise ConfigError(
            key("max_thinking_tokens"), f"must be 0 (none) or at least {MIN_THINKING_TOKENS}"
        )
    fallbacks = cfg["fallback_models"]
    if not isinstance(fallbacks, list) or not all(
        isinstance(m, str) and m.strip() and len(m) <= 128 for m in fallbacks
    ):
        raise ConfigError(key("fallback_models"), "must be a list of model names")
    server_tool_uses = _positive_int(
        cfg["max_server_tool_uses_per_request"], key("max_server_tool_uses_per_request")
    )
    if server_tool_uses > MAX_SERVER_TOOL_USES:
        raise ConfigError(
            key("max_server_tool_uses_per_request"), f"must be at most {MAX_SERVER_TOOL_USES}"
        )
    daily = _money(cfg["daily_limit_usd"], key("daily_limit_usd"))
    per_session = _money(cfg["max_session_budget_usd"], key("max_session_budget_usd"))
    if per_session > daily:
        raise ConfigError(key("max_session_budget_usd"), "is above daily_limit_usd")
    return Tenant(
        name=name,
        token_sha256=frozenset(t.lower() for t in tokens),
        anthropic_api_key_env=str(
            _text(cfg["anthropic_api_key_env"], key("anthropic_api_key_env"))
        ),
        allowed_tools=tuple(tools),
        system_prompt=_text(cfg["system_prompt"], key("system_prompt"), empty=True),
        daily_limit_usd=daily,
        max_session_budget_usd=per_session,
        max_turns=_positive_int(cfg["max_turns"], key("max_turns")),
        max_concurrent_sessions=_positive_int(
            cfg["max_concurrent_sessions"], key("max_concurrent_sessions")
        ),
        time_zone=str(cfg["timezone"]),
        max_duration_s=float(_positive_int(cfg["max_duration_s"], key("max_duration_s"))),
        os_user=str(os_user) if os_user is not None else None,
        workspace_template=Path(template).resolve() if template else None,
        warm_pool_size=_count(cfg["warm_pool_size"], key("warm_pool_size")),
        warm_pool_model=_model(cfg["warm_pool_model"], key("warm_pool_model")),
        limits=limits,
        anthropic_api_key_file=key_file.resolve() if key_file is not None else None,
        require_approval=tuple(rules),
        answer_timeout_s=float(answer_timeout),
        max_answer_timeout_s=float(max_answer_timeout),
        files=files,
        events=events,
        retention_days=_count(cfg["retention_days"], key("retention_days")),
        client_cert_sans=frozenset(sans),
        client_cert_subjects=frozenset(subjects),
        allowed_efforts=tuple(dict.fromkeys(efforts)),
        max_thinking_tokens=thinking,
        fallback_models=tuple(dict.fromkeys(m.strip() for m in fallbacks)),
        mcp_servers=servers,
        mcp_timeout_s=float(_positive_int(cfg["mcp_timeout_s"], key("mcp_timeout_s"))),
        max_server_tool_uses_per_request=server_tool_uses,
        webhooks=parse_webhooks(raw.get("webhooks"), key("webhooks")),
    )


@dataclass(frozen=True)
class TenantChanges:
    """What a reload changed: tenant names, and per changed tenant the names of the
    settings that differ (never their values: some are token hashes)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _differences(old: Tenant, new: Tenant) -> tuple[str, ...]:
    return tuple(f.name for f in fields(Tenant) if getattr(old, f.name) != getattr(new, f.name))


@dataclass(frozen=True)
class _Directory:
    """One tenants file, indexed: replaced whole, never changed in place."""

    tenants: Mapping[str, Tenant]
    by_hash: Mapping[str, Tenant]
    by_san: Mapping[str, Tenant]
    by_subject: Mapping[str, Tenant]
    dev_mode: bool


def _index(tenants: list[Tenant], dev_mode: bool) -> _Directory:
    by_hash: dict[str, Tenant] = {}
    by_san: dict[str, Tenant] = {}
    by_subject: dict[str, Tenant] = {}
    for tenant in tenants:
        for index, keys, what in (
            (by_hash, tenant.token_sha256, "token_sha256"),
            (by_san, tenant.client_cert_sans, "client_cert_sans"),
            (by_subject, tenant.client_cert_subjects, "client_cert_subjects"),
        ):
            for k in keys:
                if k in index:
                    entry = "a token hash" if what == "token_sha256" else repr(k)
                    raise ConfigError(
                        f"tenants.{tenant.name}.{what}",
                        f"{entry} is also listed for tenant {index[k].name}",
                    )
                index[k] = tenant
    return _Directory({t.name: t for t in tenants}, by_hash, by_san, by_subject, dev_mode)


class TenantRegistry:
    """The configured tenants and the caller check (bearer token, client certificate).

    Services hold one registry for the server's life; a reload swaps its whole contents
    at once (`replace`), so a call sees either the old file or the new one, never a mix.
    """

    def __init__(self, tenants: list[Tenant], *, dev_mode: bool = False) -> None:
        self._current = _index(tenants, dev_mode)

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        return self._current.tenants

    @property
    def dev_mode(self) -> bool:
        return self._current.dev_mode

    @property
    def binds_certificates(self) -> bool:
        """Whether any tenant is bound to client certificates."""
        return bool(self._current.by_san or self._current.by_subject)

    @classmethod
    def dev(cls) -> TenantRegistry:
        return cls([dev_tenant()], dev_mode=True)

    @classmethod
    def load(cls, path: Path) -> TenantRegistry:
        """Read and check the whole file; raises ConfigError naming what is wrong."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                "AGENTPLANE_TENANTS_FILE", f"cannot read {path}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError("AGENTPLANE_TENANTS_FILE", f"{path} is not UTF-8 text") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path) -> TenantRegistry:
        """The tenants of `text`, the contents of the tenants file `path`."""
        where = "AGENTPLANE_TENANTS_FILE"
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(where, f"{path} is not valid TOML: {exc}") from None
        tenants = data.get("tenants")
        if not isinstance(tenants, dict) or not tenants:
            raise ConfigError(where, f"{path} defines no [tenants.<name>] table")
        for name, raw in tenants.items():
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: tenants.{name}", "must be a table")
        return cls(
            [
                _parse_tenant(name, raw, where=f"{path}:", require_credentials=True)
                for name, raw in tenants.items()
            ]
        )

    def replace(self, other: TenantRegistry) -> TenantChanges:
        """Take `other`'s tenants, all at once; what changed."""
        old, new = self._current.tenants, other._current.tenants
        changes = TenantChanges(
            added=tuple(sorted(set(new) - set(old))),
            removed=tuple(sorted(set(old) - set(new))),
            changed={
                name: diff
                for name in sorted(set(old) & set(new))
                if (diff := _differences(old[name], new[name]))
            },
        )
        self._current = other._current
        return changes

    def current(self, tenant: Tenant) -> bool:
        """Whether `tenant` is still configured (a reload may have removed it)."""
        return tenant.name in self._current.tenants

    def authenticate(self, authorization: str | None, peer: CertIdentity | None = None) -> Tenant:
        """The tenant of a call: by its client certificate (`peer`, verified by mTLS) if a
        tenant is bound to it, else by its `authorization: Bearer <token>` header value.
        A call that names two tenants (a certificate of one, a token of another) is
        refused: no certificate ever authenticates as another tenant."""
        directory = self._current  # one file for the whole check, even across a reload
        if directory.dev_mode:
            return directory.tenants[DEFAULT_TENANT]
        by_cert = _certificate_tenant(directory, peer) if peer is not None else None
        if by_cert is not None and not authorization:
            return by_cert
        if not authorization:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <token>`")
        tenant = directory.by_hash.get(hash_token(token.strip()))
        if tenant is None:
            raise Unauthenticated("unknown token")
        if by_cert is not None and by_cert.name != tenant.name:
            raise Unauthenticated(
                "the client certificate and the token belong to different tenants"
            )
        return tenant

    def key_env_names(self) -> set[str]:
        """Every variable of the server's that holds a tenant's secret: API keys, MCP
        servers' headers and variables, webhook signing secrets (scrubbed from unsandboxed
        agents' environment)."""
        names = {t.anthropic_api_key_env for t in self.tenants.values()}
        for tenant in self.tenants.values():
            hooks = tenant.webhooks
            secrets = [hooks.secret, *(e.secret for e in hooks.endpoints)]
            names.update(s.env for s in secrets if s is not None and s.env)
            for server in tenant.mcp_servers:
                pairs = server.headers if isinstance(server, RemoteServer) else server.env
                names.update(value.env for _, value in pairs if value.env)
        return names


def _certificate_tenant(directory: _Directory, peer: CertIdentity) -> Tenant | None:
    """The tenant bound to a client certificate (None: bound to none); Unauthenticated
    when its names are bound to different tenants."""
    found = {
        t.name: t
        for t in (
            directory.by_subject.get(peer.subject),
            *(directory.by_san.get(san) for san in peer.sans),
        )
        if t is not None
    }
    if len(found) > 1:
        raise Unauthenticated("the client certificate names more than one tenant")
    return next(iter(found.values()), None)
