"""The metrics of each model request, as the metering gateway settles it: the GenAI
client metrics of the OpenTelemetry conventions, and what agentplane counts besides (the
requests by status and outcome, and the cost as it accrues, by tenant and model).

GenAI conventions (histograms; their buckets): `gen_ai.client.token.usage` ({token}, by
`gen_ai.token.type` input/output, input including the cache reads and writes),
`gen_ai.client.operation.duration` (s) and `gen_ai.client.operation.time_to_first_chunk`
(s, streamed responses only), with `gen_ai.operation.name` = chat,
`gen_ai.provider.name` = anthropic, `gen_ai.request.model`, `gen_ai.response.model`,
`error.type` (the outcome, when not completed); agentplane adds
`http.response.status_code` and `agentplane.outcome`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .instruments import Instruments
from .tracing import (
    CHAT,
    ERROR_TYPE,
    HTTP_STATUS,
    OPERATION_NAME,
    PROVIDER,
    PROVIDER_NAME,
    REQUEST_MODEL,
    RESPONSE_MODEL,
)

if TYPE_CHECKING:  # typing only: telemetry is handed the records, it never meters
    from ..gateway.meter import MeteredRequest

TOKEN_USAGE = "gen_ai.client.token.usage"
OPERATION_DURATION = "gen_ai.client.operation.duration"
TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"
TOKEN_TYPE = "gen_ai.token.type"
MODEL_REQUESTS = "agentplane.model_requests"
COST = "agentplane.cost_usd"
OUTCOME = "agentplane.outcome"

# The conventions' advisory buckets.
TOKEN_BUCKETS = tuple(4**i for i in range(14))  # 1, 4, 16, ... 67108864
# Seconds: the conventions' 0.01 to 81.92, then longer generations (the gateway waits for
# up to 10 minutes between chunks).
SECONDS_BUCKETS = (
    *(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92),
    *(163.84, 327.68),
)


class ModelRequestMetrics:
    """Records each settled model request (see the module docstring)."""

    def __init__(self, instruments: Instruments) -> None:
        self.tokens = instruments.histogram(
            TOKEN_USAGE, "{token}", "Tokens per model request, by type", TOKEN_BUCKETS
        )
        self.duration = instruments.histogram(
            OPERATION_DURATION, "s", "Model request duration", SECONDS_BUCKETS
        )
        self.first_chunk = instruments.histogram(
            TIME_TO_FIRST_CHUNK,
            "s",
            "Time from a streamed model request to its response's first chunk",
            SECONDS_BUCKETS,
        )
        self.requests = instruments.counter(
            MODEL_REQUESTS,
            "{request}",
            "Model requests settled by the metering gateway, by tenant, model, HTTP status "
            "and outcome",
        )
        self.cost = instruments.counter(
            COST, "{USD}", "Cost of model requests as they settle, by tenant and model"
        )

    def settled(self, tenant: str, request: MeteredRequest) -> None:
        status = str(request.status) if request.status is not None else ""
        self.requests.add(
            1,
            {
                "tenant": tenant,
                "model": request.model,
                "status": status,
                "outcome": request.outcome,
            },
        )
        if request.cost_usd:
            self.cost.add(float(request.cost_usd), {"tenant": tenant, "model": request.model})
        labels: dict[str, Any] = {
            OPERATION_NAME: CHAT,
            PROVIDER_NAME: PROVIDER,
            REQUEST_MODEL: request.model,
            OUTCOME: request.outcome,
        }
        if request.response.model:
            labels[RESPONSE_MODEL] = request.response.model
        if request.status is not None:
            labels[HTTP_STATUS] = request.status
        if request.outcome != "completed":
            labels[ERROR_TYPE] = request.outcome or "error"
        ended = request.ended_at or request.started_at
        self.duration.record(max((ended - request.started_at).total_seconds(), 0.0), labels)
        if request.first_chunk_at is not None:
            waited = (request.first_chunk_at - request.started_at).total_seconds()
            self.first_chunk.record(max(waited, 0.0), labels)
        usage = request.usage
        inputs = (
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )
        if request.outcome != "completed" and not inputs + usage.output_tokens:
            return  # refused, failed, or no usage read: no token count to report
        self.tokens.record(inputs, {**labels, TOKEN_TYPE: "input"})
        self.tokens.record(usage.output_tokens, {**labels, TOKEN_TYPE: "output"})
