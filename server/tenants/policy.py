"""A tenant's policy as the server uses it: who it is, what its agents may do and spend.

Values only: `schema.py` makes them from the tenants file, `registry.py` holds the
configured ones. A session keeps the Tenant it was admitted with.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from ..domain import OnBudgetExhausted
from ..mcp.servers import McpServer
from ..sandbox.limits import SessionLimits
from .webhooks import WebhookPolicy

DEFAULT_TENANT = "default"
# The SDK's effort levels (ClaudeAgentOptions.effort).
EFFORTS = ("low", "medium", "high", "xhigh", "max")
# The smallest thinking budget the Messages API takes.
MIN_THINKING_TOKENS = 1024
# The input files of one request travel in it: the gRPC server takes messages this large.
MAX_INPUT_TOTAL_BYTES = 64 << 20
# The largest max_server_tool_uses_per_request (the gateway reserves for every use).
MAX_SERVER_TOOL_USES = 100


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
    # What its sessions do when a model request would pass their budget (a request may
    # say otherwise): END them, or PAUSE them for at most max_pause_s until it is raised.
    on_budget_exhausted: OnBudgetExhausted = OnBudgetExhausted.END
    max_pause_s: float = 3600.0

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
