"""A server whose telemetry goes to this test process: spans over real OTLP/gRPC to an
OtlpReceiver, metrics to an in-memory reader (and Prometheus), logs as JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agentplane.server.telemetry.logs import JsonFormatter
from agentplane.server.telemetry.otel_env import OtelConfig
from agentplane.server.telemetry.setup import ContentPolicy, Telemetry
from harness import Harness, start_harness, stop_harness
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from otlp_receiver import OtlpReceiver


def hexid(raw: bytes) -> str:
    return raw.hex()


@dataclass
class Traced:
    """A server with telemetry pointed at this test's receiver, reader and log buffer."""

    h: Harness
    telemetry: Telemetry
    receiver: OtlpReceiver
    memory: InMemoryMetricReader
    logs: io.StringIO
    stopped: bool = False

    async def stop(self) -> None:
        """Stop the server (which flushes its telemetry); the receiver keeps what it got."""
        if not self.stopped:
            self.stopped = True
            await stop_harness(self.h)

    async def close(self) -> None:
        await self.stop()
        await self.receiver.stop()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines()]

    async def spans(
        self, ready: Callable[[list[trace_pb2.Span]], bool], timeout: float = 60.0
    ) -> list[trace_pb2.Span]:
        """Flush until the received spans satisfy `ready`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if not self.stopped:  # a blocking flush whose export this loop must serve
                await asyncio.to_thread(self.telemetry.tracer_provider.force_flush)  # type: ignore[attr-defined]
            spans = [span for _, span in self.receiver.spans()]
            if ready(spans) or asyncio.get_running_loop().time() > deadline:
                return spans
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """agentplane's log records as the server writes them: JSON lines, into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("agentplane")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def start_traced(
    database_url: str,
    logs: io.StringIO,
    *,
    extra_tenants: str = "",
    content: ContentPolicy | None = None,
    prometheus: bool = False,
) -> Traced:
    """A harness server exporting to a new OtlpReceiver (metrics only at shutdown)."""
    receiver = OtlpReceiver()
    await receiver.start()
    memory = InMemoryMetricReader()
    config = OtelConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "3600000",  # so only the shutdown exports metrics
        }
    )
    telemetry = Telemetry.create(
        config,
        content=content,
        prometheus=("127.0.0.1", 0) if prometheus else None,
        metric_readers=[memory],
    )
    h = await start_harness(database_url, extra_tenants=extra_tenants, telemetry=telemetry)
    return Traced(h, telemetry, receiver, memory, logs)
