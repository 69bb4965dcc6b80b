"""A real OTLP/gRPC receiver on loopback: the collector end of the wire, for tests."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def value_of(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict."""
    return {kv.key: value_of(kv.value) for kv in kvs}


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: list[trace_service_pb2.ExportTraceServiceRequest]) -> None:
        self._sink = sink

    async def Export(self, request: Any, context: Any) -> Any:
        self._sink.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: list[metrics_service_pb2.ExportMetricsServiceRequest]) -> None:
        self._sink = sink

    async def Export(self, request: Any, context: Any) -> Any:
        self._sink.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """TraceService and MetricsService on 127.0.0.1 (an ephemeral port); keeps what it gets."""

    def __init__(self) -> None:
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _Traces(self.trace_requests), self._server
        )
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _Metrics(self.metric_requests), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(None)

    def spans(self) -> list[tuple[dict[str, Any], trace_pb2.Span]]:
        """Every span received, with its resource's attributes."""
        return [
            (attributes(rs.resource.attributes), span)
            for request in self.trace_requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def metric_names(self) -> set[str]:
        return {
            metric.name
            for request in self.metric_requests
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
