"""The webhook metrics (OpenTelemetry instruments): attempts by outcome, and how long
after its event a delivery arrived."""

from __future__ import annotations

from opentelemetry import metrics

METER_NAME = "agentplane"

WEBHOOK_ATTEMPTS = "agentplane.webhook.attempts"
WEBHOOK_LATENCY = "agentplane.webhook.latency"

# Seconds from an event to its delivery: well under a second when the receiver is up,
# up to the tenant's retry window when it is not.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400)


class WebhookMetrics:
    """Labels: `tenant`, `event` (session.ended, ...), and on attempts `outcome`: the
    delivery's state after the attempt (DELIVERED, PENDING: a retry is due, FAILED: given
    up)."""

    def __init__(self, provider: metrics.MeterProvider) -> None:
        meter = provider.get_meter(METER_NAME)
        self.attempts = meter.create_counter(
            WEBHOOK_ATTEMPTS,
            unit="{attempt}",
            description="Webhook delivery attempts, by the delivery's state after each",
        )
        self.latency = meter.create_histogram(
            WEBHOOK_LATENCY,
            unit="s",
            description="Time from an event to its webhook's delivery",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )

    def attempted(self, tenant: str, event: str, outcome: str) -> None:
        self.attempts.add(1, {"tenant": tenant, "event": event, "outcome": outcome})

    def delivered(self, tenant: str, event: str, seconds: float) -> None:
        self.latency.record(seconds, {"tenant": tenant, "event": event})
