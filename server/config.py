"""Settings from the environment, validated once at start-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError
from .sessions.cli_env import MAX_SOCKET_DIR_BYTES
from .telemetry.setup import DEFAULT_SERVICE_NAME, OtelConfig

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite:///./agentplane.db"
DEFAULT_WORK_DIR = "./.agentplane"
MAX_WORK_DIR_BYTES = MAX_SOCKET_DIR_BYTES // 2
# One session costs ~0.5 CPU-s and ~210 MiB; CPU, not memory, bounds how many run well.
DEFAULT_MAX_SESSIONS = 4 * (os.cpu_count() or 1)

# name -> (default, help): the single source for `--help` and the README table.
SETTINGS: Mapping[str, tuple[str, str]] = {
    "AGENTPLANE_LISTEN": (DEFAULT_LISTEN, "host:port the gRPC server binds"),
    "AGENTPLANE_DATABASE_URL": (
        DEFAULT_DATABASE_URL,
        "SQLAlchemy URL: sqlite:///path or postgresql://user@host/db",
    ),
    "AGENTPLANE_TENANTS_FILE": ("", "TOML tenants file; unset: dev mode, one `default` tenant, no auth"),
    "ANTHROPIC_BASE_URL": ("", "the model API behind the metering gateway; unset: the Anthropic API"),
    "AGENTPLANE_WORK_DIR": (DEFAULT_WORK_DIR, "root of per-session working directories (keep short)"),
    "AGENTPLANE_CLI_PATH": ("", "the Claude Code CLI; unset: the one bundled with claude-agent-sdk"),
    "AGENTPLANE_CLI_MAX_RETRIES": ("", "caps the CLI's own model-API retries (CLAUDE_CODE_MAX_RETRIES)"),
    "AGENTPLANE_AUTO_MIGRATE": ("", "1: migrate at start-up; default: only for SQLite"),
    "AGENTPLANE_MAX_SESSIONS": (
        str(DEFAULT_MAX_SESSIONS), "sessions this server runs at once (default: 4 per CPU)"
    ),
    "AGENTPLANE_SESSION_IDLE_TIMEOUT_S": (
        "120", "a session with no event for this long ends ERROR/TIMEOUT"
    ),
    "AGENTPLANE_RETRY_ATTEMPTS": ("3", "attempts per session for transient failures (1: no retry)"),
    "AGENTPLANE_RETRY_BASE_DELAY_S": ("1", "first retry delay; doubles per retry, with jitter"),
    "AGENTPLANE_PRICES_FILE": (
        "", "TOML price table overriding the packaged one (model -> $/Mtok in, out, cache)"
    ),
    "AGENTPLANE_SHUTDOWN_GRACE_S": (
        "25", "on SIGTERM, how long running sessions get to finish before they are interrupted"
    ),
    "AGENTPLANE_LEASE_TTL_S": (
        "30", "a session whose server stopped renewing its lease this long ends ERROR/INTERRUPTED"
    ),
    "AGENTPLANE_WARM_POOL_MAX_AGE_S": (
        "600", "warm agents (tenants' warm_pool_size) unused this long are replaced"
    ),
    "AGENTPLANE_WARM_POOL_MIN_AVAILABLE_MIB": (
        "1024", "no warm agent starts while the machine has less available memory than this"
    ),
    "AGENTPLANE_HEALTH_INTERVAL_S": ("5", "how often readiness re-checks the database"),
    "AGENTPLANE_LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING or ERROR"),
    "AGENTPLANE_PROMETHEUS_PORT": (
        "", "serve Prometheus /metrics on this port, on the AGENTPLANE_LISTEN host; unset: off"
    ),
    "AGENTPLANE_TRACE_CONTENT": (
        "0", "1: put prompts, results and tool inputs/outputs on spans (never by default)"
    ),
    "AGENTPLANE_TRACE_CONTENT_MAX_CHARS": (
        "4096", "with AGENTPLANE_TRACE_CONTENT=1, the most characters kept of each"
    ),
    "OTEL_EXPORTER_OTLP_ENDPOINT": (
        "", "OTLP collector for spans and metrics, e.g. http://collector:4317; unset: no export"
    ),
    "OTEL_EXPORTER_OTLP_PROTOCOL": (
        "grpc", "grpc or http/protobuf (per signal: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, ...)"
    ),
    "OTEL_SERVICE_NAME": (DEFAULT_SERVICE_NAME, "service.name on spans and metrics"),
    "OTEL_SDK_DISABLED": ("", "true: no spans, no OpenTelemetry metrics (JSON logs stay)"),
    "OTEL_TRACES_EXPORTER": ("otlp", "otlp, console or none"),
    "OTEL_METRICS_EXPORTER": ("otlp", "otlp or none (Prometheus is AGENTPLANE_PROMETHEUS_PORT)"),
    "OTEL_METRIC_EXPORT_INTERVAL": ("60000", "milliseconds between OTLP metric exports"),
}


@dataclass(frozen=True)
class Settings:
    """Validated server settings."""

    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    tenants_file: Path | None = None
    anthropic_base_url: str | None = None
    work_dir: Path = field(default_factory=lambda: Path(DEFAULT_WORK_DIR).resolve())
    cli_path: Path | None = None
    cli_max_retries: int | None = None
    auto_migrate: bool | None = None
    max_sessions: int = DEFAULT_MAX_SESSIONS
    session_idle_timeout_s: float = 120.0
    retry_attempts: int = 3
    retry_base_delay_s: float = 1.0
    shutdown_grace_s: float = 25.0
    prices_file: Path | None = None
    lease_ttl_s: float = 30.0
    health_interval_s: float = 5.0
    log_level: str = "INFO"
    prometheus_port: int | None = None
    trace_content: bool = False
    trace_content_max_chars: int = 4096
    warm_pool_max_age_s: float = 600.0
    warm_pool_min_available_mib: int = 1024
    otel: OtelConfig = field(default_factory=OtelConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raises ConfigError naming the first bad one."""
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name, "").strip() or SETTINGS[name][0]

        listen = get("AGENTPLANE_LISTEN")
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError("AGENTPLANE_LISTEN", f"{listen!r} is not host:port")

        database_url = get("AGENTPLANE_DATABASE_URL")
        try:
            backend = make_url(database_url).get_backend_name()
        except ArgumentError:
            raise ConfigError("AGENTPLANE_DATABASE_URL", f"{database_url!r} is not a URL") from None
        if backend not in ("sqlite", "postgresql"):
            raise ConfigError("AGENTPLANE_DATABASE_URL", f"unsupported database {backend!r}")

        tenants = env.get("AGENTPLANE_TENANTS_FILE", "").strip()
        tenants_file = Path(tenants) if tenants else None
        if tenants_file is not None and not tenants_file.is_file():
            raise ConfigError("AGENTPLANE_TENANTS_FILE", f"{tenants} is not a file")

        base_url = env.get("ANTHROPIC_BASE_URL", "").strip() or None
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            raise ConfigError("ANTHROPIC_BASE_URL", f"{base_url!r} is not an http(s) URL")

        work_dir = Path(get("AGENTPLANE_WORK_DIR")).resolve()
        # <work_dir>/<tenant>/<16-char session dir>/t must fit the CLI's socket path.
        if len(os.fsencode(str(work_dir))) > MAX_WORK_DIR_BYTES:
            raise ConfigError(
                "AGENTPLANE_WORK_DIR",
                f"{work_dir} is longer than {MAX_WORK_DIR_BYTES} bytes, too long for the "
                "agent CLI's socket path; choose a shorter folder",
            )

        cli = env.get("AGENTPLANE_CLI_PATH", "").strip()
        cli_path = Path(cli) if cli else None

        retries_raw = env.get("AGENTPLANE_CLI_MAX_RETRIES", "").strip()
        if retries_raw and not retries_raw.isdigit():
            raise ConfigError("AGENTPLANE_CLI_MAX_RETRIES", f"{retries_raw!r} is not an integer >= 0")

        auto = env.get("AGENTPLANE_AUTO_MIGRATE", "").strip().lower()
        if auto not in ("", "0", "1", "true", "false"):
            raise ConfigError("AGENTPLANE_AUTO_MIGRATE", f"{auto!r} is not 0 or 1")

        max_sessions = get("AGENTPLANE_MAX_SESSIONS")
        if not max_sessions.isdigit() or int(max_sessions) < 1:
            raise ConfigError("AGENTPLANE_MAX_SESSIONS", f"{max_sessions!r} is not an integer >= 1")
        idle_s = _seconds(get, "AGENTPLANE_SESSION_IDLE_TIMEOUT_S")
        attempts = get("AGENTPLANE_RETRY_ATTEMPTS")
        if not attempts.isdigit() or not 1 <= int(attempts) <= 20:
            raise ConfigError("AGENTPLANE_RETRY_ATTEMPTS", f"{attempts!r} is not an integer in 1..20")
        base_delay_s = _seconds(get, "AGENTPLANE_RETRY_BASE_DELAY_S")
        prices = env.get("AGENTPLANE_PRICES_FILE", "").strip()
        if prices and not Path(prices).is_file():
            raise ConfigError("AGENTPLANE_PRICES_FILE", f"{prices} is not a file")
        grace_s = _seconds(get, "AGENTPLANE_SHUTDOWN_GRACE_S")
        lease_s = _seconds(get, "AGENTPLANE_LEASE_TTL_S")
        health_s = _seconds(get, "AGENTPLANE_HEALTH_INTERVAL_S")

        level = get("AGENTPLANE_LOG_LEVEL").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("AGENTPLANE_LOG_LEVEL", f"{level!r} is not a log level")

        prometheus = env.get("AGENTPLANE_PROMETHEUS_PORT", "").strip()
        if prometheus and (not prometheus.isdigit() or int(prometheus) > 65535):
            raise ConfigError("AGENTPLANE_PROMETHEUS_PORT", f"{prometheus!r} is not a port number")
        content = get("AGENTPLANE_TRACE_CONTENT").lower()
        if content not in ("0", "1", "true", "false"):
            raise ConfigError("AGENTPLANE_TRACE_CONTENT", f"{content!r} is not 0 or 1")
        content_max = get("AGENTPLANE_TRACE_CONTENT_MAX_CHARS")
        if not content_max.isdigit() or int(content_max) < 1:
            raise ConfigError(
                "AGENTPLANE_TRACE_CONTENT_MAX_CHARS", f"{content_max!r} is not an integer >= 1"
            )

        pool_age_s = _seconds(get, "AGENTPLANE_WARM_POOL_MAX_AGE_S")
        pool_mib = get("AGENTPLANE_WARM_POOL_MIN_AVAILABLE_MIB")
        if not pool_mib.isdigit():
            raise ConfigError(
                "AGENTPLANE_WARM_POOL_MIN_AVAILABLE_MIB", f"{pool_mib!r} is not an integer >= 0"
            )

        return cls(
            listen=listen,
            database_url=database_url,
            tenants_file=tenants_file,
            anthropic_base_url=base_url,
            work_dir=work_dir,
            cli_path=cli_path,
            cli_max_retries=int(retries_raw) if retries_raw else None,
            auto_migrate=None if auto == "" else auto in ("1", "true"),
            max_sessions=int(max_sessions),
            session_idle_timeout_s=idle_s,
            retry_attempts=int(attempts),
            retry_base_delay_s=base_delay_s,
            shutdown_grace_s=grace_s,
            prices_file=Path(prices) if prices else None,
            lease_ttl_s=lease_s,
            health_interval_s=health_s,
            log_level=level,
            prometheus_port=int(prometheus) if prometheus else None,
            trace_content=content in ("1", "true"),
            trace_content_max_chars=int(content_max),
            warm_pool_max_age_s=pool_age_s,
            warm_pool_min_available_mib=int(pool_mib),
            otel=OtelConfig.from_env(env),
        )

    @property
    def migrate_at_start(self) -> bool:
        if self.auto_migrate is not None:
            return self.auto_migrate
        return make_url(self.database_url).get_backend_name() == "sqlite"

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """Where /metrics is served: the listen host, AGENTPLANE_PROMETHEUS_PORT."""
        if self.prometheus_port is None:
            return None
        return self.listen.rpartition(":")[0].strip("[]"), self.prometheus_port


def _seconds(get: Callable[[str], str], name: str) -> float:
    raw = get(name)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(name, f"{raw!r} is not a positive number of seconds")
    return value


def settings_help() -> str:
    """The environment settings, for `--help`."""
    width = max(map(len, SETTINGS))
    lines = ["environment:"]
    for name, (default, text) in SETTINGS.items():
        suffix = f" (default: {default})" if default else ""
        lines.append(f"  {name:<{width}}  {text}{suffix}")
    return "\n".join(lines)
