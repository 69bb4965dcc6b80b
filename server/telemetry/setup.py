"""Tracer and meter providers and their exporters, from the standard OTEL_* variables.

Nothing here is global: a `Telemetry` holds its own providers, so every App (and every
test) has its own and the process-wide OpenTelemetry defaults are never set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry, start_http_server

from .otel_env import OtelConfig

log = logging.getLogger(__name__)

HEALTH_SERVICE = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class ContentPolicy:
    """Whether prompts and tool inputs/outputs go on spans (off by default), and how much."""

    capture: bool = False
    max_chars: int = 4096

    def cap(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars] + "…"


def _span_exporters(config: OtelConfig) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    if "console" in config.traces_exporters:
        exporters.append(ConsoleSpanExporter())
    if "otlp" in config.traces_exporters and config.traces_endpoint:
        if config.traces_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        exporters.append(OTLPSpanExporter(endpoint=config.traces_endpoint))
    return exporters


def _metric_readers(config: OtelConfig) -> list[MetricReader]:
    if "otlp" not in config.metrics_exporters or not config.metrics_endpoint:
        return []
    if config.metrics_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
    exporter = OTLPMetricExporter(endpoint=config.metrics_endpoint)
    return [PeriodicExportingMetricReader(exporter, config.metric_export_interval_ms)]


class EndpointUnavailable(Exception):
    """The Prometheus endpoint cannot listen where it was asked to; says where and why."""


class PrometheusEndpoint:
    """`/metrics` over HTTP from a registry of its own (not prometheus_client's global)."""

    def __init__(self, host: str, port: int) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        self.registry = CollectorRegistry(auto_describe=True)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # in use, not an address of this machine, no such name
            raise EndpointUnavailable(
                f"cannot bind {host}:{port} ({exc.strerror or exc})"
            ) from None
        self.reader = PrometheusMetricReader(registry=self.registry)
        self.host = host

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclass
class Telemetry:
    """One server's tracer and meter providers, what to record, and their shutdown."""

    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    content: ContentPolicy = field(default_factory=ContentPolicy)
    prometheus: PrometheusEndpoint | None = None

    @classmethod
    def create(
        cls,
        config: OtelConfig,
        *,
        content: ContentPolicy | None = None,
        prometheus: tuple[str, int] | None = None,
        span_processors: Iterable[SpanProcessor] = (),
        metric_readers: Iterable[MetricReader] = (),
    ) -> Telemetry:
        """Providers per `config`, plus a Prometheus endpoint on (host, port) when given,
        and any extra processors/readers (tests add in-memory ones)."""
        content = content or ContentPolicy()
        if config.disabled:
            return cls(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), content)
        # First: it may fail (EndpointUnavailable), before anything else has started.
        endpoint = PrometheusEndpoint(*prometheus) if prometheus is not None else None
        resource = Resource.create({SERVICE_NAME: config.service_name})
        processors: list[SpanProcessor] = [BatchSpanProcessor(e) for e in _span_exporters(config)]
        processors += span_processors
        # With nowhere to send spans, record none: their contexts still carry the caller's
        # trace id into logs and to the CLI, at a fraction of the CPU.
        sampler = None if processors else ALWAYS_OFF
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False, sampler=sampler)
        for processor in processors:
            tracer_provider.add_span_processor(processor)
        readers = [*_metric_readers(config), *metric_readers]
        if endpoint is not None:
            readers.append(endpoint.reader)
            log.info("prometheus_listening", extra={"address": f"{endpoint.host}:{endpoint.port}"})
        meter_provider = MeterProvider(
            metric_readers=readers, resource=resource, shutdown_on_exit=False
        )
        return cls(tracer_provider, meter_provider, content, endpoint)

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls.create(OtelConfig(disabled=True))

    @property
    def tracing(self) -> bool:
        return isinstance(self.tracer_provider, TracerProvider)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The gRPC server span interceptor (continues the caller's traceparent; health
        checks are not traced)."""
        if not self.tracing:
            return []
        from .rpc import ServerSpans  # it needs this module's ContentPolicy

        tracer = self.tracer_provider.get_tracer("agentplane.grpc")
        return [ServerSpans(tracer, skip=lambda method: method.startswith(HEALTH_SERVICE))]

    def shutdown(self) -> None:
        """Flush and stop (blocking: exporters may wait on the network)."""
        if isinstance(self.tracer_provider, TracerProvider):
            self.tracer_provider.shutdown()
        if isinstance(self.meter_provider, MeterProvider):
            self.meter_provider.shutdown()
        if self.prometheus is not None:
            self.prometheus.close()
