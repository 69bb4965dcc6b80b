"""Settings from the environment, validated once at start-up.

Each setting is declared once, as a field of `Settings`: its variable, parser, default and
help text. `Settings.from_env`, the dataclass defaults, `--help` and docs/configuration.md's
settings table (tests/test_config.py compares it) all come from those declarations.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError
from .sandbox.uids import DEFAULT_RANGE, parse_range

# The one dependency on telemetry, and one way only: Settings carries the OTEL_* variables
# as the value telemetry defines and parses (without the SDK; app.py wires the providers).
from .telemetry.otel_env import OtelConfig

T = TypeVar("T")

# <work_dir>/<tenant>/<16-char session dir>/t must fit the folder of the agent CLI's unix
# socket, at most sessions.cli_env.MAX_SOCKET_DIR_BYTES (80); the work dir gets half. A copy,
# not an import, so that config does not depend on sessions (a test pins the two together).
MAX_WORK_DIR_BYTES = 40
# One session costs ~0.5 CPU-s and ~210 MiB; CPU, not memory, bounds how many run well.
SESSIONS_PER_CPU = 4

_SETTING = "agentplane.setting"  # the key of a field's Setting in its dataclass metadata


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: how it is read, its default and what it means."""

    env: str
    # The text (stripped; `default` when unset or blank) -> the value, or ValueError with the
    # reason. None: only documented here, parsed by OtelConfig.from_env.
    parse: Callable[[str], T] | None
    default: str  # "" = none: the setting is unset
    help: str  # Markdown, for docs/configuration.md; --help prints it without backticks
    shown: str | None = None  # how the docs name a default that is not one literal value
    # Checks the value against this machine. Only from_env runs it, so that Settings() with
    # a default never fails (e.g. in a deep current directory).
    check: Callable[[T], None] | None = None

    def __post_init__(self) -> None:
        if not self.default and self.shown is None:
            raise TypeError(f"{self.env}: say in `shown` what unset means")

    @property
    def default_text(self) -> str:
        """The default as docs/configuration.md and --help name it."""
        return self.shown if self.shown is not None else f"`{self.default}`"

    def read(self, env: Mapping[str, str]) -> T:
        """The value `env` gives; raises ConfigError naming the variable."""
        if self.parse is None:
            raise TypeError(f"{self.env} is read by OtelConfig.from_env")
        raw = env.get(self.env, "").strip() or self.default
        try:
            value = self.parse(raw)
            if self.check is not None:
                self.check(value)
        except ValueError as exc:
            raise ConfigError(self.env, str(exc)) from None
        return value


def setting(
    env: str,
    parse: Callable[[str], T],
    default: str,
    help: str,
    *,
    shown: str | None = None,
    check: Callable[[T], None] | None = None,
) -> T:
    """A `Settings` field read from `env`; its dataclass default is `parse(default)`."""
    declared = Setting(env, parse, default, help, shown, check)
    # A factory, not a value: work_dir resolves against the directory current at creation.
    return field(default_factory=lambda: parse(default), metadata={_SETTING: declared})


# -- parsers: the text -> the value, or ValueError(the reason) ------------------------------


def _optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    """Unset -> None, else `parse`."""
    return lambda raw: parse(raw) if raw else None


def _host_port(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{raw!r} is not host:port")
    return raw


def _port(raw: str) -> int:
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"{raw!r} is not a port number")
    return int(raw)


def _database_url(raw: str) -> str:
    try:
        backend = make_url(raw).get_backend_name()
    except ArgumentError:
        raise ValueError(f"{raw!r} is not a URL") from None
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {backend!r}")
    return raw


def _http_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError(f"{raw!r} is not an http(s) URL")
    return raw


def _file(raw: str) -> Path:
    if not Path(raw).exists():
        raise ValueError(f"{raw} does not exist: create the file, or mount it there")
    if not Path(raw).is_file():
        raise ValueError(f"{raw} is not a file")
    return Path(raw)


def _absolute(raw: str) -> Path:
    return Path(raw).resolve()


def _short_enough(work_dir: Path) -> None:
    if len(os.fsencode(str(work_dir))) > MAX_WORK_DIR_BYTES:
        raise ValueError(
            f"{work_dir} is longer than {MAX_WORK_DIR_BYTES} bytes, too long for the "
            "agent CLI's socket path; choose a shorter folder"
        )


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """A parser of whole numbers in low..high (no upper bound when high is None)."""
    bounds = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(raw: str) -> int:
        if not raw.isdigit() or int(raw) < low or (high is not None and int(raw) > high):
            raise ValueError(f"{raw!r} is not an integer {bounds}")
        return int(raw)

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):  # also refuses nan
        raise ValueError(f"{raw!r} is not a positive number of seconds")
    return value


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value not in ("0", "1", "true", "false"):
        raise ValueError(f"{value!r} is not 0 or 1")
    return value in ("1", "true")


def _sandbox(raw: str) -> bool:
    value = raw.lower()
    if value not in ("bwrap", "none"):
        raise ValueError(f"{raw!r} is not `bwrap` or `none`")
    return value == "bwrap"


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{level!r} is not a log level")
    return level


# -- the settings, in the order of --help and docs/configuration.md ----------------------------


@dataclass(frozen=True)
class Settings:
    """Validated server settings; each field declares the variable it is read from."""

    # setting() returns a field() with a default_factory, so no instance shares a default
    # object with another: RUF009 cannot see that (hence its noqa on the Path fields).

    listen: str = setting(
        "AGENTPLANE_LISTEN", _host_port, "127.0.0.1:50051", "host:port the gRPC server binds"
    )
    tls_cert_file: Path | None = setting(  # noqa: RUF009
        "AGENTPLANE_TLS_CERT_FILE",
        _optional(_file),
        "",
        "PEM certificate chain: with `AGENTPLANE_TLS_KEY_FILE`, the gRPC port speaks only TLS; "
        "both are re-read when they change (no restart)",
        shown="unset (plaintext)",
    )
    tls_key_file: Path | None = setting(  # noqa: RUF009
        "AGENTPLANE_TLS_KEY_FILE",
        _optional(_file),
        "",
        "the certificate's PEM private key (unencrypted)",
        shown="unset",
    )
    tls_client_ca_file: Path | None = setting(  # noqa: RUF009
        "AGENTPLANE_TLS_CLIENT_CA_FILE",
        _optional(_file),
        "",
        "PEM CA certificate(s): mTLS, every client must present a certificate one of them "
        "signed; tenants may be bound to certificates (`client_cert_sans`, "
        "`client_cert_subjects`); re-read when it changes",
        shown="unset (no client certificates)",
    )
    database_url: str = setting(
        "AGENTPLANE_DATABASE_URL",
        _database_url,
        "sqlite:///./agentplane.db",
        "`sqlite:///path` or `postgresql://user@host/db` (psycopg 3)",
    )
    database_listen_url: str | None = setting(
        "AGENTPLANE_DATABASE_LISTEN_URL",
        _optional(_database_url),
        "",
        "`postgresql://...` straight to PostgreSQL, for the one LISTEN connection, when "
        "`AGENTPLANE_DATABASE_URL` goes through PgBouncer in transaction mode; set, the pools "
        "send no startup options, prepare no statements and set the statement timeout in "
        "each transaction",
        shown="unset (`AGENTPLANE_DATABASE_URL`, no pooler)",
    )
    db_statement_timeout_s: float = setting(
        "AGENTPLANE_DB_STATEMENT_TIMEOUT_S",
        _seconds,
        "10",
        "PostgreSQL: a statement running longer is cancelled and its call answered "
        "UNAVAILABLE (migrations are exempt)",
    )
    db_pool_timeout_s: float = setting(
        "AGENTPLANE_DB_POOL_TIMEOUT_S",
        _seconds,
        "5",
        "how long a call waits for a free database connection before it is answered UNAVAILABLE",
    )
    db_pool_size: int = setting(
        "AGENTPLANE_DB_POOL_SIZE",
        _integer(1),
        "5",
        "PostgreSQL: connections of the callers' pool kept while in use (each closed once "
        "idle for `AGENTPLANE_DB_IDLE_TIMEOUT_S`)",
    )
    db_pool_overflow: int = setting(
        "AGENTPLANE_DB_POOL_OVERFLOW",
        _integer(0),
        "5",
        "PostgreSQL: more connections the callers' pool opens for a burst, each closed as "
        "soon as it is returned",
    )
    db_write_pool_size: int = setting(
        "AGENTPLANE_DB_WRITE_POOL_SIZE",
        _integer(1),
        "4",
        "PostgreSQL: the same for the running sessions' own pool (events, model requests, "
        "leases, their end; and the readiness checks)",
    )
    db_write_pool_overflow: int = setting(
        "AGENTPLANE_DB_WRITE_POOL_OVERFLOW",
        _integer(0),
        "2",
        "PostgreSQL: the running sessions' pool's burst connections",
    )
    db_idle_timeout_s: float = setting(
        "AGENTPLANE_DB_IDLE_TIMEOUT_S",
        _seconds,
        "60",
        "PostgreSQL: a pooled connection unused this long is closed (an idle replica keeps "
        "two: one of the sessions' pool, one LISTEN)",
    )
    tenants_file: Path | None = setting(  # noqa: RUF009
        "AGENTPLANE_TENANTS_FILE",
        _optional(_file),
        "",
        "TOML tenants file, re-read on SIGHUP and when it changes (an invalid one is "
        "ignored: health `agentplane.tenants` NOT_SERVING); unset = dev mode: one "
        "`default` tenant, no auth (logged), on loopback only (see the next)",
        shown="unset",
    )
    allow_unauthenticated: bool = setting(
        "AGENTPLANE_ALLOW_UNAUTHENTICATED",
        _bool,
        "0",
        "`1`: a server without `AGENTPLANE_TENANTS_FILE` (dev mode: no auth) may listen beyond "
        "loopback, serving anyone who reaches it (logged as a warning); `0`: it refuses to "
        "start there (exit 2)",
    )
    tenants_poll_s: float = setting(
        "AGENTPLANE_TENANTS_POLL_S",
        _seconds,
        "1",
        "how often the tenants file is read to see whether it changed",
    )
    anthropic_base_url: str | None = setting(
        "ANTHROPIC_BASE_URL",
        _optional(_http_url),
        "",
        "the model API behind the metering gateway (unset: the Anthropic API)",
        shown="unset",
    )
    gateway_max_body_mib: int = setting(
        "AGENTPLANE_GATEWAY_MAX_BODY_MIB",
        _integer(1, 1024),
        "32",
        "the largest request body the metering gateway reads from an agent, 1..1024 MiB; a "
        "larger one is answered 413 before it is read (the Messages API's own limit is 32 MB)",
    )
    work_dir: Path = setting(  # noqa: RUF009
        "AGENTPLANE_WORK_DIR",
        _absolute,
        "./.agentplane",
        f"root of per-session working directories; at most {MAX_WORK_DIR_BYTES} bytes as an "
        "absolute path (the CLI's unix-socket path limit)",
        check=_short_enough,
    )
    host_dir: Path | None = setting(  # noqa: RUF009
        "AGENTPLANE_HOST_DIR",
        _optional(_absolute),
        "",
        "where the servers of this host list their work dirs: each server, at its start, "
        "removes the session folders and processes that dead ones left in any of them",
        shown="`/run/agentplane` (root), else `<temp dir>/agentplane-<uid>`",
    )
    cli_path: Path | None = setting(  # noqa: RUF009
        "AGENTPLANE_CLI_PATH",
        _optional(Path),
        "",
        "the Claude Code CLI binary",
        shown="the bundled CLI",
    )
    sandbox: bool = setting(
        "AGENTPLANE_SANDBOX",
        _sandbox,
        "bwrap",
        "`bwrap`: every session runs in its own bubblewrap sandbox with cgroup limits (the "
        "server does not start where it cannot build one); `none`: agents run unsandboxed "
        "(unsafe with more than one tenant; logged at start, health `agentplane.sandbox` "
        "NOT_SERVING)",
        shown="`bwrap`",
    )
    sandbox_uids: tuple[int, int] = setting(
        "AGENTPLANE_SANDBOX_UIDS",
        parse_range,
        f"{DEFAULT_RANGE[0]}-{DEFAULT_RANGE[1]}",
        "host uids for sandboxed sessions, FIRST-LAST: each live session runs as one of its "
        "own (shared with the other servers of the host through AGENTPLANE_HOST_DIR); no "
        "user of the host may hold one (tenants with an os_user run as that user instead)",
    )
    cli_max_retries: int | None = setting(
        "AGENTPLANE_CLI_MAX_RETRIES",
        _optional(_integer(0)),
        "",
        "caps the CLI's own model-API retries (`CLAUDE_CODE_MAX_RETRIES`)",
        shown="CLI default (10)",
    )
    auto_migrate: bool | None = setting(
        "AGENTPLANE_AUTO_MIGRATE",
        _optional(_bool),
        "",
        "apply migrations at start-up",
        shown="`1` for SQLite, else `0`",
    )
    max_sessions: int = setting(
        "AGENTPLANE_MAX_SESSIONS",
        _integer(1),
        str(SESSIONS_PER_CPU * (os.cpu_count() or 1)),
        "agents this server runs at once (sessions and warm agents); while full its "
        "health `agentplane.admission` is NOT_SERVING and RunSession is "
        "UNAVAILABLE/REPLICA_FULL (clients retry it on another replica)",
        shown=f"{SESSIONS_PER_CPU} per CPU",
    )
    session_idle_timeout_s: float = setting(
        "AGENTPLANE_SESSION_IDLE_TIMEOUT_S",
        _seconds,
        "120",
        "a session with no event for this long is interrupted: ERROR/TIMEOUT (the CLI itself "
        "notices a stalled stream only after 300 s)",
    )
    retry_attempts: int = setting(
        "AGENTPLANE_RETRY_ATTEMPTS",
        _integer(1, 20),
        "3",
        "attempts per session for transient failures, 1..20 (1 = no retry)",
    )
    retry_base_delay_s: float = setting(
        "AGENTPLANE_RETRY_BASE_DELAY_S",
        _seconds,
        "1",
        "first retry delay; doubles per retry (cap 30 s), times a random factor in [0.5, 1]",
    )
    prices_file: Path | None = setting(  # noqa: RUF009
        "AGENTPLANE_PRICES_FILE",
        _optional(_file),
        "",
        "TOML price table (model -> $ per Mtok input, output, cache_write, cache_read, a "
        "long-context premium; $ per server-tool use) overriding `server/money/prices.toml`",
        shown="the packaged table",
    )
    shutdown_grace_s: float = setting(
        "AGENTPLANE_SHUTDOWN_GRACE_S",
        _seconds,
        "25",
        "on SIGTERM/SIGINT, how long running sessions get to finish before they end ERROR/SHUTDOWN",
    )
    lease_ttl_s: float = setting(
        "AGENTPLANE_LEASE_TTL_S",
        _seconds,
        "30",
        "a session whose server stopped renewing its lease for this long is closed "
        "ERROR/INTERRUPTED by any server",
    )
    warm_pool_max_age_s: float = setting(
        "AGENTPLANE_WARM_POOL_MAX_AGE_S",
        _seconds,
        "600",
        "warm agents (a tenant's `warm_pool_size`) unused this long are closed and replaced",
    )
    warm_pool_min_available_mib: int = setting(
        "AGENTPLANE_WARM_POOL_MIN_AVAILABLE_MIB",
        _integer(0),
        "1024",
        "no warm agent starts while the machine's `MemAvailable` is below this",
    )
    health_interval_s: float = setting(
        "AGENTPLANE_HEALTH_INTERVAL_S",
        _seconds,
        "5",
        "how often readiness re-checks the database (through the running sessions' pool; "
        "the callers' pool while a call found it failing)",
    )
    retention_interval_s: float = setting(
        "AGENTPLANE_RETENTION_INTERVAL_S",
        _seconds,
        "3600",
        "how often ended sessions past their tenant's retention_days are deleted",
    )
    webhook_timeout_s: float = setting(
        "AGENTPLANE_WEBHOOK_TIMEOUT_S",
        _seconds,
        "10",
        "a webhook attempt whose receiver has not answered in this long fails (and is "
        "retried per its tenant's `webhooks` table); redirects are never followed",
    )
    log_level: str = setting(
        "AGENTPLANE_LOG_LEVEL",
        _log_level,
        "INFO",
        "`DEBUG`, `INFO`, `WARNING`, `ERROR` (logs are JSON lines on stderr)",
    )
    prometheus_port: int | None = setting(
        "AGENTPLANE_PROMETHEUS_PORT",
        _optional(_port),
        "",
        "serve Prometheus `/metrics` on this port, bound to the `AGENTPLANE_LISTEN` host",
        shown="unset (off)",
    )
    trace_content: bool = setting(
        "AGENTPLANE_TRACE_CONTENT",
        _bool,
        "0",
        "`1`: put prompts, results and tool inputs/outputs on spans (never by default)",
    )
    trace_content_max_chars: int = setting(
        "AGENTPLANE_TRACE_CONTENT_MAX_CHARS",
        _integer(1),
        "4096",
        "with `AGENTPLANE_TRACE_CONTENT=1`, the most characters kept of each",
    )
    # The OTEL_* variables, parsed by OtelConfig.from_env; documented in OTEL_SETTINGS.
    otel: OtelConfig = field(default_factory=OtelConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raises ConfigError naming the first bad one."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            f.name: f.metadata[_SETTING].read(env) for f in fields(cls) if _SETTING in f.metadata
        }
        _check_tls(values)
        _check_listen_url(values)
        return cls(**values, otel=OtelConfig.from_env(env))

    @property
    def migrate_at_start(self) -> bool:
        if self.auto_migrate is not None:
            return self.auto_migrate
        return make_url(self.database_url).get_backend_name() == "sqlite"

    @property
    def pooled(self) -> bool:
        """Whether AGENTPLANE_DATABASE_URL goes through a pooler in transaction mode (the
        operator gave the LISTEN connection a URL of its own)."""
        return self.database_listen_url is not None

    @property
    def direct_url(self) -> str:
        """PostgreSQL itself, not through a pooler: for the LISTEN connection and
        migrations (AGENTPLANE_DATABASE_LISTEN_URL, else AGENTPLANE_DATABASE_URL)."""
        return self.database_listen_url or self.database_url

    @property
    def listen_host(self) -> str:
        """The host of AGENTPLANE_LISTEN, without an IPv6 address's brackets."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """Where /metrics is served: the listen host, AGENTPLANE_PROMETHEUS_PORT."""
        if self.prometheus_port is None:
            return None
        return self.listen_host, self.prometheus_port

    def check_exposure(self, dev_mode: bool) -> None:
        """ConfigError when dev mode (no tenants file: every caller is served, unasked)
        would listen beyond loopback without AGENTPLANE_ALLOW_UNAUTHENTICATED=1."""
        if dev_mode and not self.allow_unauthenticated and not is_loopback(self.listen_host):
            raise ConfigError(
                "AGENTPLANE_TENANTS_FILE",
                "unset, so every caller would be served without auth (dev mode), and "
                f"AGENTPLANE_LISTEN={self.listen} is reachable beyond this machine: set "
                "AGENTPLANE_TENANTS_FILE to a tenants file, or listen on 127.0.0.1, or set "
                "AGENTPLANE_ALLOW_UNAUTHENTICATED=1 to serve it unauthenticated anyway",
            )


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback only: localhost,
    127.0.0.0/8 or ::1. Any other name, and 0.0.0.0 or :: (every interface), is not."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: it may resolve to any address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _check_listen_url(values: Mapping[str, Any]) -> None:
    """A LISTEN URL is PostgreSQL's, beside a PostgreSQL database URL."""
    listen = values["database_listen_url"]
    if listen is None:
        return
    if make_url(listen).get_backend_name() != "postgresql":
        raise ConfigError(
            "AGENTPLANE_DATABASE_LISTEN_URL",
            "must be a postgresql:// URL (PostgreSQL itself, not a pooler in transaction mode)",
        )
    if make_url(values["database_url"]).get_backend_name() != "postgresql":
        raise ConfigError(
            "AGENTPLANE_DATABASE_LISTEN_URL",
            "is for PostgreSQL only: AGENTPLANE_DATABASE_URL is not a postgresql:// URL "
            "(unset AGENTPLANE_DATABASE_LISTEN_URL)",
        )


def _check_tls(values: Mapping[str, Any]) -> None:
    """The TLS files go together: a certificate with its key, a client CA only with both."""
    cert, key = values["tls_cert_file"], values["tls_key_file"]
    if (cert is None) != (key is None):
        missing = "AGENTPLANE_TLS_KEY_FILE" if key is None else "AGENTPLANE_TLS_CERT_FILE"
        raise ConfigError(
            missing,
            "TLS needs both AGENTPLANE_TLS_CERT_FILE and "
            "AGENTPLANE_TLS_KEY_FILE; set it too (or unset the other)",
        )
    if values["tls_client_ca_file"] is not None and cert is None:
        raise ConfigError(
            "AGENTPLANE_TLS_CLIENT_CA_FILE",
            "mTLS needs TLS: set AGENTPLANE_TLS_CERT_FILE and AGENTPLANE_TLS_KEY_FILE too",
        )


_OTEL = OtelConfig()  # the defaults OtelConfig.from_env falls back on
# Parsed by OtelConfig.from_env (with per-signal variants); declared here for the docs only.
OTEL_SETTINGS: tuple[Setting[Any], ...] = (
    Setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        None,
        "",
        "OTLP collector for spans and metrics, e.g. `http://collector:4317`; "
        "`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `..._METRICS_ENDPOINT` per signal",
        shown="unset (no export)",
    ),
    Setting(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        None,
        _OTEL.traces_protocol,
        "`grpc` or `http/protobuf` (per signal: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, "
        "`..._METRICS_PROTOCOL`)",
    ),
    Setting(
        "OTEL_SERVICE_NAME",
        None,
        _OTEL.service_name,
        "`service.name` of spans and metrics (`OTEL_RESOURCE_ATTRIBUTES` adds more)",
    ),
    Setting(
        "OTEL_SDK_DISABLED",
        None,
        str(_OTEL.disabled).lower(),
        "`true`: no spans and no OpenTelemetry metrics (JSON logs stay)",
    ),
    Setting(
        "OTEL_TRACES_EXPORTER",
        None,
        ",".join(_OTEL.traces_exporters),
        "`otlp`, `console` or `none`",
    ),
    Setting(
        "OTEL_METRICS_EXPORTER",
        None,
        ",".join(_OTEL.metrics_exporters),
        "`otlp` or `none` (Prometheus is `AGENTPLANE_PROMETHEUS_PORT`)",
    ),
    Setting(
        "OTEL_METRIC_EXPORT_INTERVAL",
        None,
        str(_OTEL.metric_export_interval_ms),
        "milliseconds between OTLP metric exports",
    ),
)

# Every setting, in the order of --help and docs/configuration.md: Settings' own, then OTEL_*.
SETTINGS: tuple[Setting[Any], ...] = (
    *(f.metadata[_SETTING] for f in fields(Settings) if _SETTING in f.metadata),
    *OTEL_SETTINGS,
)


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


def settings_help() -> str:
    """The environment settings, for `--help`: one line each (so they grep well)."""
    width = max(len(s.env) for s in SETTINGS)
    return "\n".join(
        [
            "environment:",
            *(
                f"  {s.env:<{width}}  {_plain(s.help)} (default: {_plain(s.default_text)})"
                for s in SETTINGS
            ),
        ]
    )


def settings_table() -> str:
    """docs/configuration.md's settings table, in Markdown (a test checks the page has it)."""
    return "\n".join(
        [
            "| variable | default | meaning |",
            "|---|---|---|",
            *(f"| `{s.env}` | {s.default_text} | {s.help} |" for s in SETTINGS),
        ]
    )
