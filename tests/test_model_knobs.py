"""Model knobs within policy: effort, thinking budget and a fallback model, against the
real CLI. What reached the model is read from the sandbox model's requests; what was
charged from GetUsage (the gateway's metered requests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import grpc
import pytest
from agentplane.server.model_double import HttpFailure, Script, Step
from agentplane.v1 import session_pb2, usage_pb2
from harness import TOKENS, Harness, error_details, start_harness, stop_harness, tenant_toml

pytestmark = pytest.mark.asyncio

EFFORT_MODEL = "claude-opus-4-5"  # the CLI sends an effort only to models that take one
FALLBACK = "claude-haiku-4-5"
KNOBS = tenant_toml(
    "knobs",
    "knobs-token",
    anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
    allowed_tools=["Read"],
    allowed_efforts=["low", "high"],
    max_thinking_tokens=4096,
    fallback_models=[FALLBACK, "claude-sonnet-4-5"],
    daily_limit_usd=50.0,
)


@pytest.fixture(scope="module")
async def knobs(database_url: str) -> AsyncIterator[Harness]:
    # The CLI falls back after three overloaded answers in a row: it must retry to get there.
    h = await start_harness(database_url, extra_tenants=KNOBS, cli_max_retries=3)
    TOKENS["knobs"] = "knobs-token"
    try:
        yield h
    finally:
        TOKENS.pop("knobs")
        await stop_harness(h)


def conversation(h: Harness, script: str) -> list[dict[str, Any]]:
    return [
        r.body
        for r in h.sandbox.requests
        if r.kind == "conversation" and r.script == script and r.body
    ]


async def test_effort_and_thinking_budget_reach_the_model(knobs: Harness) -> None:
    knobs.sandbox.add_script("knobs_effort", Script(steps=[Step(text="thought hard")]))
    events = await knobs.run(
        "knobs",
        prompt="[[sandbox:knobs_effort]] go",
        model=EFFORT_MODEL,
        effort="high",
        max_thinking_tokens=2048,
    )
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    (body,) = conversation(knobs, "knobs_effort")
    assert body["output_config"]["effort"] == "high"
    assert body["thinking"]["budget_tokens"] == 2048


async def test_a_fallback_model_answers_when_the_first_is_overloaded_and_is_priced(
    knobs: Harness,
) -> None:
    knobs.sandbox.add_script(
        "knobs_fallback",
        Script(
            steps=[
                Step(text="answered by the fallback", failures=[HttpFailure(529)] * 3),
            ]
        ),
    )
    events = await knobs.run(
        "knobs",
        prompt="[[sandbox:knobs_fallback]] go",
        model="claude-sonnet-4-5",
        fallback_model=FALLBACK,
    )
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert [b["model"] for b in conversation(knobs, "knobs_fallback")] == [
        "claude-sonnet-4-5"
    ] * 3 + [FALLBACK]
    texts = [e.assistant_text for e in events if e.HasField("assistant_text")]
    assert [(t.text, t.model) for t in texts] == [("answered by the fallback", FALLBACK)]
    fell_back = [
        e.system for e in events if e.HasField("system") and e.system.subtype == "model_fallback"
    ]
    assert fell_back, "the CLI's model_fallback message is an event"
    usage = await knobs.usage.GetUsage(usage_pb2.GetUsageRequest(), metadata=knobs.auth("knobs"))
    by_model = {m.model: m for m in usage.models}
    assert by_model[FALLBACK].requests_by_outcome.get("completed", 0) >= 1
    assert Decimal(by_model[FALLBACK].cost_usd) > 0
    assert Decimal(final.cost_usd) > 0


async def test_a_repeated_request_id_with_other_knobs_is_a_reuse(knobs: Harness) -> None:
    knobs.sandbox.add_script("knobs_repeat", Script(steps=[Step(text="once")]))
    request_id = "9b1f4a2e-3c5d-4e6f-8a7b-0c1d2e3f4a5b"
    first = await knobs.run(
        "knobs", prompt="[[sandbox:knobs_repeat]] go", effort="low", request_id=request_id
    )
    assert first[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await knobs.run(
            "knobs", prompt="[[sandbox:knobs_repeat]] go", effort="high", request_id=request_id
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)["BadRequest"].field_violations[0].field == "request_id"


@pytest.mark.parametrize(
    ("tenant", "fields", "field", "says"),
    [
        ("knobs", {"effort": "max"}, "effort", "not among the tenant's efforts (low, high)"),
        ("knobs", {"effort": "extreme"}, "effort", "not among"),
        ("acme", {"effort": "low"}, "effort", "model's default only"),
        ("knobs", {"max_thinking_tokens": 8192}, "max_thinking_tokens", "maximum 4096"),
        ("knobs", {"max_thinking_tokens": 512}, "max_thinking_tokens", "between 1024"),
        ("knobs", {"max_thinking_tokens": -1}, "max_thinking_tokens", "between 1024"),
        ("acme", {"max_thinking_tokens": 2048}, "max_thinking_tokens", "allows no thinking"),
        ("knobs", {"fallback_model": "claude-opus-4-5"}, "fallback_model", "not among"),
        (
            "knobs",
            {"fallback_model": "claude-sonnet-4-5", "model": "claude-sonnet-4-5"},
            "fallback_model",
            "must differ",
        ),
        ("knobs", {"fallback_model": "bad\0model"}, "fallback_model", "NUL"),
        ("acme", {"fallback_model": FALLBACK}, "fallback_model", "(none)"),
    ],
)
async def test_knobs_outside_the_tenants_policy_are_invalid(
    knobs: Harness,
    tenant: str,
    fields: dict[str, Any],
    field: str,
    says: str,
) -> None:
    fields.setdefault("model", "claude-sonnet-4-5")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await knobs.run(tenant, prompt="hello", **fields)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = error_details(err)["BadRequest"].field_violations
    assert violation.field == field and says in violation.description
