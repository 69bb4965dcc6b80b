"""The gRPC server's call metrics, as gRPC's own OpenTelemetry plugin names them (gRFC
A66): `grpc.server.call.started` ({call}, by `grpc.method`) and
`grpc.server.call.duration` (s, by `grpc.method` and `grpc.status`, the code's name:
OK, RESOURCE_EXHAUSTED, ...). A streaming call lasts as long as its stream."""

from __future__ import annotations

import grpc

from .instruments import Instruments

CALL_STARTED = "grpc.server.call.started"
CALL_DURATION = "grpc.server.call.duration"
METHOD = "grpc.method"
STATUS = "grpc.status"

# Seconds: unary calls take milliseconds; RunSession and StreamSession last as long as
# their sessions.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class CallMetrics:
    """Counts calls as they start and records their duration as they end."""

    def __init__(self, instruments: Instruments) -> None:
        self._started = instruments.counter(CALL_STARTED, "{call}", "gRPC calls started, by method")
        self._duration = instruments.histogram(
            CALL_DURATION, "s", "gRPC call duration, by method and status code", BUCKETS
        )

    def started(self, method: str) -> None:
        self._started.add(1, {METHOD: method.lstrip("/")})

    def ended(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._duration.record(max(seconds, 0.0), {METHOD: method.lstrip("/"), STATUS: code.name})
