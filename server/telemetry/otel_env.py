"""The standard OTEL_* variables agentplane reads, parsed and validated.

Plain parsing with no OpenTelemetry imports, so that the settings (config.py) can validate
these variables at start-up without loading the SDK; setup.py builds the providers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_SERVICE_NAME = "agentplane"
PROTOCOLS = ("grpc", "http/protobuf")
TRACES_EXPORTERS = ("otlp", "console", "none")
METRICS_EXPORTERS = ("otlp", "none")


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def _names(
    env: Mapping[str, str], name: str, allowed: Sequence[str], default: Sequence[str]
) -> tuple[str, ...]:
    raw = env.get(name, "").strip().lower() or ",".join(default)
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for n in names:
        if n not in allowed:
            raise ConfigError(name, f"{n!r} is not one of {', '.join(allowed)}")
    return tuple(n for n in names if n != "none")


def _protocol(env: Mapping[str, str], signal: str, default: str) -> str:
    name = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if not env.get(name, "").strip():
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
    value = env.get(name, "").strip().lower() or default
    if value not in PROTOCOLS:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(PROTOCOLS)}")
    return value


def _endpoint(env: Mapping[str, str], signal: str, protocol: str) -> str | None:
    """The signal's own endpoint, else the common one (+ /v1/<signal> for OTLP/HTTP)."""
    own = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    if own:
        return own
    common = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not common:
        return None
    if not common.startswith(("http://", "https://")):
        raise ConfigError("OTEL_EXPORTER_OTLP_ENDPOINT", f"{common!r} is not an http(s) URL")
    if protocol == "http/protobuf":
        return common.rstrip("/") + f"/v1/{signal.lower()}"
    return common


@dataclass(frozen=True)
class OtelConfig:
    """The standard OpenTelemetry variables agentplane reads (the exporters read the rest
    themselves: OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION, OTEL_BSP_*, ...)."""

    disabled: bool = False
    service_name: str = DEFAULT_SERVICE_NAME
    traces_exporters: tuple[str, ...] = ("otlp",)
    traces_endpoint: str | None = None
    traces_protocol: str = "grpc"
    metrics_exporters: tuple[str, ...] = ("otlp",)
    metrics_endpoint: str | None = None
    metrics_protocol: str = "grpc"
    metric_export_interval_ms: int = 60_000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OtelConfig:
        """Read and validate; raises ConfigError naming the first bad variable. An unset
        variable takes the field's default (the settings' --help shows the same ones)."""
        default = cls()
        traces_protocol = _protocol(env, "TRACES", default.traces_protocol)
        metrics_protocol = _protocol(env, "METRICS", default.metrics_protocol)
        interval = env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip() or str(
            default.metric_export_interval_ms
        )
        if not interval.isdigit() or int(interval) < 1:
            raise ConfigError(
                "OTEL_METRIC_EXPORT_INTERVAL", f"{interval!r} is not milliseconds > 0"
            )
        return cls(
            disabled=_flag(env, "OTEL_SDK_DISABLED"),
            service_name=env.get("OTEL_SERVICE_NAME", "").strip() or default.service_name,
            traces_exporters=_names(
                env, "OTEL_TRACES_EXPORTER", TRACES_EXPORTERS, default.traces_exporters
            ),
            traces_endpoint=_endpoint(env, "TRACES", traces_protocol),
            traces_protocol=traces_protocol,
            metrics_exporters=_names(
                env, "OTEL_METRICS_EXPORTER", METRICS_EXPORTERS, default.metrics_exporters
            ),
            metrics_endpoint=_endpoint(env, "METRICS", metrics_protocol),
            metrics_protocol=metrics_protocol,
            metric_export_interval_ms=int(interval),
        )
