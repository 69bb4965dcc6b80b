"""Sessions of the real CLI whose model searches the web, reads past a long-context
threshold, or is priced lower than the CLI prices it: every unit metered, bounded by the
budget, shown in GetUsage, and checked against the CLI's own count.

The CLI's WebSearch tool is a side request of its own to the model with the server tool
`web_search_20250305` (max_uses 8); the scripts name the sandbox script that answers it
in the search query, which the CLI puts in that request's prompt.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from agentplane.server.model_double import RecordedRequest, Script, Step, ToolCall, Usage
from agentplane.server.telemetry.metrics import METERING_SHORTFALL
from agentplane.server.telemetry.otel_env import OtelConfig
from agentplane.server.telemetry.setup import Telemetry
from agentplane.v1 import budget_pb2, session_pb2, usage_pb2
from harness import TOKENS, Harness, short_dir, start_harness, stop_harness, tenant_toml
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(os.geteuid() != 0, reason="the session sandbox needs root"),
]

MODEL = "claude-sonnet-4-5"
KEY = "AGENTPLANE_TEST_ACME_KEY"
TOKENS.update({"web": "web-token-29", "searcher": "searcher-token-29", "longctx": "long-token-29"})
M = Decimal(1_000_000)
SEARCH = Decimal("0.01")  # $10 per 1,000 searches


def sonnet_bill(usage: Usage) -> Decimal:
    """What upstream bills for one Sonnet 4.5 response below 200k input tokens, at the list
    prices written out here (not read from agentplane's table)."""
    tokens = (
        usage.input_tokens * 3
        + usage.output_tokens * 15
        + usage.cache_creation_input_tokens * Decimal("3.75")
        + usage.cache_read_input_tokens * Decimal("0.30")
    ) / M
    return tokens + SEARCH * usage.server_tool_use.get("web_search_requests", 0)


@pytest.fixture(scope="module")
async def h(database_url: str) -> AsyncIterator[Harness]:
    tables = [
        tenant_toml(
            "web",
            TOKENS["web"],
            anthropic_api_key_env=KEY,
            allowed_tools=["WebSearch"],
            max_server_tool_uses_per_request=5,
            daily_limit_usd=20.0,
            max_session_budget_usd=5.0,
            max_turns=10,
        ),
        tenant_toml(
            "searcher",
            TOKENS["searcher"],
            anthropic_api_key_env=KEY,
            allowed_tools=["WebSearch"],
            daily_limit_usd=3.0,
            max_session_budget_usd=1.0,
            max_turns=40,
        ),
        tenant_toml(
            "longctx",
            TOKENS["longctx"],
            anthropic_api_key_env=KEY,
            allowed_tools=["Read"],
            daily_limit_usd=20.0,
            max_session_budget_usd=5.0,
            max_turns=4,
        ),
    ]
    harness = await start_harness(database_url, extra_tenants="\n".join(tables))
    yield harness
    await stop_harness(harness)


def search_call(script: str, query: str) -> ToolCall:
    return ToolCall("WebSearch", {"query": f"[[sandbox:{script}]] {query}"})


def final(events: list[session_pb2.SessionEvent]) -> session_pb2.Session:
    assert events and events[-1].HasField("result"), events[-1:]
    return events[-1].result.session


async def usage_of(h: Harness, tenant: str) -> usage_pb2.Usage:
    return await h.usage.GetUsage(usage_pb2.GetUsageRequest(), metadata=h.auth(tenant))


def billed(requests: list[RecordedRequest]) -> Decimal:
    return sum((sonnet_bill(r.usage) for r in requests if r.usage is not None), Decimal(0))


async def test_a_search_is_metered_per_use_capped_and_agrees_with_the_cli(h: Harness) -> None:
    h.sandbox.add_script(
        "tsm_main",
        Script(
            steps=[
                Step(
                    tool_calls=[search_call("tsm_search", "agentplane metering")],
                    usage=Usage(2000, 60),
                ),
                Step(text="Found it.", usage=Usage(2500, 40)),
            ]
        ),
    )
    # The model asks for more searches than the request allows: it gets max_uses of them.
    searched = Usage(6000, 150, 0, 0, {"web_search_requests": 7})
    h.sandbox.add_script("tsm_search", Script(steps=[Step(text="Results.", usage=searched)]))
    session = final(await h.run("web", prompt="[[sandbox:tsm_main]] search", model=MODEL))
    assert session.state == session_pb2.SESSION_STATE_COMPLETE, session.error

    # The CLI asked for 8 uses; the tenant allows 5 per request.
    (search,) = h.sandbox.find(script="tsm_search")
    assert search.body is not None
    assert search.body["tools"] == [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    ]
    assert search.usage is not None and search.usage.server_tool_use == {"web_search_requests": 5}

    # Tokens plus five searches, at the list prices; the CLI's own count agrees.
    expected = sonnet_bill(Usage(2000, 60)) + sonnet_bill(Usage(2500, 40))
    expected += sonnet_bill(Usage(6000, 150, 0, 0, {"web_search_requests": 5}))
    assert Decimal(session.cost_usd) == expected == Decimal("0.08525")
    assert Decimal(session.sdk_cost_usd) == expected
    assert dict(session.usage.server_tool_use) == {"web_search_requests": 5}
    assert session.usage.input_tokens == 10_500

    got = await h.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=session.id), metadata=h.auth("web")
    )
    assert dict(got.usage.server_tool_use) == {"web_search_requests": 5}
    usage = await usage_of(h, "web")
    (model,) = [m for m in usage.models if m.model == MODEL]
    assert model.requests_total == 3 and Decimal(model.cost_usd) == expected
    assert dict(model.usage.server_tool_use) == {"web_search_requests": 5}
    assert usage.sessions_short == 0 and Decimal(usage.shortfall_usd) == 0


async def test_a_session_that_searches_a_lot_ends_at_its_budget(h: Harness) -> None:
    """The hostile tenant: $1 sessions whose model searches on every turn, eight searches
    per request, at $0.01 each on top of the tokens."""
    steps = [
        Step(tool_calls=[search_call("tsm_flood", f"query {i}")], usage=Usage(3000, 40))
        for i in range(30)
    ]
    h.sandbox.add_script("tsm_hostile", Script(steps=steps))
    # Each search's results stay within the input the gateway reserves per use.
    flood = Usage(8000, 300, 0, 0, {"web_search_requests": 8})
    h.sandbox.add_script("tsm_flood", Script(steps=[Step(text="More results.", usage=flood)]))
    session = final(await h.run("searcher", prompt="[[sandbox:tsm_hostile]] search", model=MODEL))

    assert session.state == session_pb2.SESSION_STATE_ERROR
    assert session.error.reason == session_pb2.ERROR_REASON_BUDGET_EXCEEDED, session.error
    # What the CLI sends for a WebSearch call (the tenant's cap is the default, 8): as is,
    # until the budget left cannot hold 8 searches; then fewer.
    sent = [r.body["tools"] for r in h.sandbox.find(script="tsm_flood") if r.body]
    assert sent[0] == [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}]
    allowed = [tools[0]["max_uses"] for tools in sent]
    assert allowed == sorted(allowed, reverse=True) and allowed[-1] < 8
    answered = [r for r in h.sandbox.find(script="tsm_flood") if r.usage is not None]
    searches = sum(
        r.usage.server_tool_use.get("web_search_requests", 0) for r in answered if r.usage
    )
    assert len(answered) >= 5 and searches >= 30
    # Every search counted: what was recorded is what upstream bills, and within the budget.
    upstream = billed(h.sandbox.find(script="tsm_hostile") + h.sandbox.find(script="tsm_flood"))
    assert Decimal(session.cost_usd) == upstream
    assert Decimal(session.cost_usd) <= Decimal(1)
    assert dict(session.usage.server_tool_use) == {"web_search_requests": searches}
    # The day's window holds them.
    budget = await h.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=h.auth("searcher"))
    assert Decimal(budget.spent_usd) == upstream
    usage = await usage_of(h, "searcher")
    assert [dict(m.usage.server_tool_use) for m in usage.models] == [
        {"web_search_requests": searches}
    ]


async def test_long_context_requests_are_priced_at_the_premium(h: Harness) -> None:
    h.sandbox.add_script(
        "tsm_long", Script(steps=[Step(text="Read it all.", usage=Usage(230_000, 500))])
    )
    session = final(await h.run("longctx", prompt="[[sandbox:tsm_long]] read", model=MODEL))
    assert session.state == session_pb2.SESSION_STATE_COMPLETE, session.error
    # Above 200k input tokens Sonnet 4.5 costs $6 in and $22.50 out per Mtok.
    assert Decimal(session.cost_usd) == (230_000 * 6 + 500 * Decimal("22.5")) / M
    # The CLI knows no premium for it: it counts less, which is no shortfall.
    assert Decimal(session.sdk_cost_usd) == (230_000 * 3 + 500 * 15) / M

    # Haiku 5.5's premium (above 100k) is in the CLI's catalog too: both counts agree.
    h.sandbox.add_script(
        "tsm_haiku", Script(steps=[Step(text="Read it all.", usage=Usage(150_000, 1_000))])
    )
    haiku = final(
        await h.run("longctx", prompt="[[sandbox:tsm_haiku]] read", model="claude-haiku-5-5")
    )
    assert haiku.state == session_pb2.SESSION_STATE_COMPLETE, haiku.error
    premium = (150_000 * Decimal("0.5") + 1_000 * Decimal("2.5")) / M
    assert Decimal(haiku.cost_usd) == premium == Decimal(haiku.sdk_cost_usd)
    assert (await usage_of(h, "longctx")).sessions_short == 0


# -- the check against the CLI's own count ------------------------------------------------


CHEAP = """
version = "too-cheap-1"
[models."claude-sonnet-4-5"]   # a tenth of the list prices: a table that lacks something
input = 0.3
output = 1.5
cache_write = 0.375
cache_read = 0.03
"""


async def test_a_meter_below_the_clis_count_is_logged_counted_and_shown(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = short_dir("prc")
    prices = folder / "prices.toml"
    prices.write_text(CHEAP)
    memory = InMemoryMetricReader()
    telemetry = Telemetry.create(OtelConfig.from_env({}), metric_readers=[memory])
    h = await start_harness(database_url, telemetry=telemetry, prices_file=prices)
    try:
        h.sandbox.add_script(
            "tsm_cheap", Script(steps=[Step(text="ok", usage=Usage(100_000, 1_000))])
        )
        with caplog.at_level(logging.WARNING, logger="agentplane.server.sessions.run.lifecycle"):
            session = final(await h.run("acme", prompt="[[sandbox:tsm_cheap]] hi", model=MODEL))
        assert session.state == session_pb2.SESSION_STATE_COMPLETE, session.error
        cli = (100_000 * 3 + 1_000 * 15) / M
        metered = cli / 10
        assert (Decimal(session.sdk_cost_usd), Decimal(session.cost_usd)) == (cli, metered)
        gap = cli - metered

        usage = await usage_of(h, "acme")
        assert usage.sessions_short == 1 and Decimal(usage.shortfall_usd) == gap
        lines = [r for r in caplog.records if r.getMessage() == "metering_shortfall"]
        assert len(lines) == 1
        line: Any = lines[0]
        assert (line.session_id, line.tenant, line.model) == (session.id, "acme", MODEL)
        assert (Decimal(line.cli_cost_usd), Decimal(line.metered_cost_usd)) == (cli, metered)
        data: Any = memory.get_metrics_data()
        points = [
            (dict(point.attributes), point.value)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == METERING_SHORTFALL
            for point in metric.data.data_points
        ]
        assert points == [({"tenant": "acme", "model": MODEL}, pytest.approx(float(gap)))]
    finally:
        await stop_harness(h)
        prices.unlink()
        Path(folder).rmdir()
