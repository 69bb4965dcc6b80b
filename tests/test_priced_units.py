"""Every priced unit of a response: server-tool uses and long-context premiums, from the
usage the stream reports (in the shapes of Anthropic's SDK fixtures among them) to the price table and
the gateway's reservation (direct requests through the gateway to the sandbox model)."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from agentplane.server.domain import TokenUsage
from agentplane.server.gateway.meter import SERVER_TOOL_RESULT_TOKENS, SessionMeter
from agentplane.server.gateway.proxy import MeteringGateway
from agentplane.server.gateway.sse import SseUsageParser, usage_from_message
from agentplane.server.model_double import SandboxServer, Script, Step, Usage
from agentplane.server.money.pricing import PriceTable, PriceTableError

PRICES = PriceTable.load()
FIXTURES = Path(__file__).parent / "fixtures" / "sse"
KEY = "sk-ant-api03-units-" + secrets.token_urlsafe(16)
SEARCH = {"type": "web_search_20250305", "name": "web_search"}
M = Decimal(1_000_000)


def _feed(raw: bytes, size: int) -> SseUsageParser:
    parser = SseUsageParser()
    for i in range(0, len(raw), size):
        parser.feed(raw[i : i + size])
    parser.close()
    return parser


def _chunkings(raw: bytes) -> list[int]:
    return [1, 37, len(raw)]


# -- the streams: in the shapes of Anthropic's SDK fixtures, and a web-search stream --------


def test_cumulative_delta_counts_and_a_web_search() -> None:
    raw = (FIXTURES / "message_delta_fields_response.txt").read_bytes()
    for size in _chunkings(raw):
        parser = _feed(raw, size)
        assert parser.saw_usage and parser.saw_stop and parser.error is None
        # The delta repeats the input counts, cumulative (25 -> 40, 10 -> 12, 5 -> 7), and
        # reports one web search (web_fetch_requests 0 counts as none).
        assert parser.usage == TokenUsage(40, 8, 12, 7, 0, {"web_search_requests": 1})
        price = PRICES.price("claude-sonnet-4-5")
        # 40*3 + 8*15 + 12*3.75 + 7*0.30 micro-dollars, plus one search at $0.01.
        assert price.cost(parser.usage) == Decimal("0.000287") + Decimal("0.01")


def test_no_usage_at_the_start_and_a_compaction() -> None:
    omitted = (FIXTURES / "usage_omitted_response.txt").read_bytes()
    compaction = (FIXTURES / "compaction_response.txt").read_bytes()
    for size in _chunkings(omitted):
        parser = _feed(omitted, size)
        assert parser.saw_usage and parser.saw_stop
        assert parser.usage == TokenUsage(12, 6)
    for size in _chunkings(compaction):
        parser = _feed(compaction, size)
        assert parser.saw_usage and parser.saw_stop
        assert parser.usage == TokenUsage(30, 8)


def test_a_stream_with_three_web_searches_costs_its_tokens_and_three_searches() -> None:
    raw = (FIXTURES / "web_search_response.txt").read_bytes()
    price = PRICES.price("claude-sonnet-4-5")
    for size in _chunkings(raw):
        parser = _feed(raw, size)
        assert parser.saw_stop and parser.error is None
        assert parser.usage == TokenUsage(14_100, 210, 0, 300, 0, {"web_search_requests": 3})
        tokens = (14_100 * 3 + 210 * 15 + 300 * Decimal("0.30")) / M
        assert price.cost(parser.usage) == tokens + 3 * Decimal("0.01") == Decimal("0.075540")


def test_usage_parsing_of_server_tools_and_iterations() -> None:
    usage = TokenUsage.from_api(
        {
            "input_tokens": 23_000,
            "output_tokens": 1_000,
            "server_tool_use": {
                "web_search_requests": 2,
                "web_fetch_requests": 0,
                "code_execution_requests": 1,
                "odd": "3",  # not a count
                "negative": -1,
            },
            # A compaction's iteration is not in the top-level counts: upstream bills the sum.
            "iterations": [
                {"type": "compaction", "input_tokens": 180_000, "output_tokens": 3_500},
                {"type": "message", "input_tokens": 23_000, "output_tokens": 1_000},
            ],
        }
    )
    assert usage == TokenUsage(
        203_000, 4_500, 0, 0, 0, {"web_search_requests": 2, "code_execution_requests": 1}
    )
    # Iterations that sum to the top level change nothing.
    same = {
        "input_tokens": 10,
        "output_tokens": 5,
        "iterations": [{"type": "message", "input_tokens": 10, "output_tokens": 5}],
    }
    assert TokenUsage.from_api(same) == TokenUsage(10, 5)
    # A non-streaming body carries them the same way.
    body = json.dumps({"usage": {"input_tokens": 1, "server_tool_use": {"web_search_requests": 4}}})
    assert usage_from_message(body.encode()) == TokenUsage(
        1, 0, server_tool_use={"web_search_requests": 4}
    )
    # Sums and maxima keep every unit.
    a = TokenUsage(1, 1, server_tool_use={"web_search_requests": 2})
    b = TokenUsage(2, 2, server_tool_use={"web_search_requests": 1, "web_fetch_requests": 5})
    assert a.plus(b).server_tool_use == {"web_search_requests": 3, "web_fetch_requests": 5}
    assert a.max_with(b).server_tool_use == {"web_search_requests": 2, "web_fetch_requests": 5}


# -- the price table ---------------------------------------------------------------------


def test_web_search_and_web_fetch_are_priced_per_use_for_every_model() -> None:
    for name, price in PRICES.models.items():
        assert price.per_use["web_search_requests"] == Decimal("0.01"), name
        assert price.per_use["web_fetch_requests"] == 0, name
    price = PRICES.price("claude-haiku-4-5")
    usage = TokenUsage(1000, 100, server_tool_use={"web_search_requests": 1000})
    # A thousand searches are $10 on top of the tokens.
    assert price.cost(usage) - price.cost(TokenUsage(1000, 100)) == Decimal(10)


def test_long_context_premium_above_the_models_threshold() -> None:
    sonnet = PRICES.price("claude-sonnet-4-5-20250929")
    # At 200k input tokens (uncached + cache writes + cache reads) the base prices hold ...
    at = TokenUsage(150_000, 1_000, 30_000, 20_000)
    assert at.prompt_tokens == 200_000
    assert (
        sonnet.cost(at)
        == (150_000 * 3 + 1_000 * 15 + 30_000 * Decimal("3.75") + 20_000 * Decimal("0.3")) / M
    )
    # ... one more and the whole request is priced at the premium: input x2, output x1.5,
    # the cache multipliers on top.
    above = TokenUsage(150_001, 1_000, 30_000, 20_000, 10_000)
    premium = (
        150_001 * 6
        + 1_000 * Decimal("22.5")
        + 20_000 * Decimal("7.5")
        + 10_000 * 12
        + 20_000 * Decimal("0.6")
    ) / M
    assert sonnet.cost(above) == premium.quantize(Decimal("0.000001"))
    assert PRICES.price("claude-sonnet-4").cost(above) == sonnet.cost(above)
    # Haiku 5.5's premium starts above 100k.
    haiku = PRICES.price("haiku")
    assert (
        haiku.cost(TokenUsage(100_000, 10)) == (100_000 * Decimal("0.1") + 10 * Decimal("0.5")) / M
    )
    assert haiku.cost(TokenUsage(100_001, 10)) == (
        (100_001 * Decimal("0.5") + 10 * Decimal("2.5")) / M
    ).quantize(Decimal("0.000001"))
    # Models without a premium are priced the same at any size.
    opus = PRICES.price("claude-opus-4-5")
    assert opus.long_context is None
    assert opus.cost(TokenUsage(900_000)) == 900_000 * 5 / M
    # The worst case of a request estimated above the threshold uses the premium.
    assert (
        sonnet.worst_case(250_000, 1_000)
        == (250_000 * Decimal("7.5") + 1_000 * Decimal("22.5")) / M
    )
    assert sonnet.worst_case(100_000, 1_000) == (100_000 * Decimal("3.75") + 1_000 * 15) / M


TABLE = """
version = "units-1"
[per_use]
web_search_requests = 0.01
[models.cheap]
input = 1
output = 2
cache_write = 1.25
cache_read = 0.1
[models.dear]
input = 1
output = 2
cache_write = 1.25
cache_read = 0.1
per_use = { web_search_requests = 0.05, web_fetch_requests = 0.002 }
"""


def test_a_unit_a_model_has_no_price_for_is_priced_at_the_highest_known() -> None:
    table = PriceTable.from_toml(TABLE)
    cheap, dear = table.price("cheap"), table.price("dear")
    assert cheap.use_price("web_search_requests") == Decimal("0.01")  # its own (the file's)
    assert dear.use_price("web_search_requests") == Decimal("0.05")
    # cheap has no web fetch price: the highest the table has for it, never 0.
    usage = TokenUsage(server_tool_use={"web_fetch_requests": 10})
    assert cheap.unpriced_units(usage) == ["web_fetch_requests"]
    assert cheap.cost(usage) == Decimal("0.02")
    # A unit no model has a price for: the table's highest per-use price.
    unknown = TokenUsage(server_tool_use={"code_execution_requests": 3})
    assert dear.unpriced_units(unknown) == ["code_execution_requests"]
    assert dear.cost(unknown) == Decimal("0.15") and cheap.cost(unknown) == Decimal("0.15")


def test_a_model_an_operator_adds_without_per_use_prices(tmp_path: Path) -> None:
    # Its file has no [per_use]: the highest prices of the merged table apply.
    path = tmp_path / "acme.toml"
    path.write_text(
        'version = "acme"\n[models.private]\ninput = 1\noutput = 2\ncache_write = 1.25\n'
        "cache_read = 0.1\n"
    )
    table = PRICES.override(path)
    private = table.price("private")
    assert private.per_use == {}
    usage = TokenUsage(server_tool_use={"web_search_requests": 2})
    assert private.unpriced_units(usage) == ["web_search_requests"]
    assert private.cost(usage) == Decimal("0.02")
    # The packaged models keep their own.
    assert table.price("claude-sonnet-4-5").unpriced_units(usage) == []


MODEL_M = 'version = "x"\n[models.m]\ninput = 1\noutput = 1\ncache_write = 1\ncache_read = 1\n'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('version = "x"\n[per_use]\nweb_search_requests = -1\n', "must be >= 0"),
        ('version = "x"\n[per_use]\n"Web Search" = 1\n', "is not a usage count name"),
        ('version = "x"\nper_use = 3\n', "must be a table of usage count name"),
        (
            MODEL_M
            + "[models.m.long_context]\ninput = 2\noutput = 2\ncache_write = 2\ncache_read = 2\n",
            "above_prompt_tokens must be a positive integer",
        ),
        (
            MODEL_M + "[models.m.long_context]\nabove_prompt_tokens = 10\ninput = 2\noutput = 2\n"
            "cache_write = 2\n",
            "long_context: missing price(s) cache_read",
        ),
        (
            MODEL_M + "per_use = { web_search_requests = true }\n",
            "must be a number",
        ),
    ],
)
def test_invalid_per_use_and_long_context_entries(text: str, problem: str) -> None:
    with pytest.raises(PriceTableError) as caught:
        PriceTable.from_toml(text, source="bad.toml")
    assert problem in str(caught.value) and "bad.toml" in str(caught.value)


# -- the gateway, between direct requests and the sandbox model ---------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway() -> AsyncIterator[MeteringGateway]:
    async with MeteringGateway(PRICES) as gw:
        yield gw


def _open(
    gateway: MeteringGateway,
    sandbox: SandboxServer,
    budget: str,
    *,
    tools: tuple[str, ...] | None = ("WebSearch",),
    cap: int = 8,
) -> SessionMeter:
    return gateway.open_session(
        f"u-{secrets.token_hex(4)}",
        budget_usd=Decimal(budget),
        upstream_base_url=sandbox.base_url,
        upstream_api_key=KEY,
        tools=tools,
        max_server_tool_uses=cap,
    )


async def _post(
    gateway: MeteringGateway, meter: SessionMeter, body: dict[str, Any]
) -> tuple[int, Any]:
    headers = {"anthropic-version": "2023-06-01", "x-api-key": meter.token}
    async with (
        aiohttp.ClientSession() as http,
        http.post(gateway.base_url + "/v1/messages", json=body, headers=headers) as resp,
    ):
        if body.get("stream"):
            return resp.status, await resp.read()
        return resp.status, await resp.json()


def _search_body(name: str, *, max_uses: int | None = None, stream: bool = True) -> dict[str, Any]:
    tool = dict(SEARCH) if max_uses is None else {**SEARCH, "max_uses": max_uses}
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 2000,
        "stream": stream,
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}, tool],
        "messages": [{"role": "user", "content": f"[[sandbox:{name}]] look it up"}],
    }


@pytest.mark.asyncio(loop_scope="module")
async def test_searches_are_metered_and_max_uses_capped_and_set(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    usage = Usage(4000, 300, 0, 0, {"web_search_requests": 5})
    sandbox.add_script("units_search", Script(steps=[Step(text="found", usage=usage)]))
    meter = _open(gateway, sandbox, "5", cap=3)
    price = PRICES.price("claude-sonnet-4-5")
    tokens = (4000 * 3 + 300 * 15) / M

    # No max_uses: the gateway sets the tenant's cap (3); the model runs 3 of its 5.
    status, raw = await _post(gateway, meter, _search_body("units_search"))
    assert (
        status == 200 and b'"web_search_requests":3' in raw and raw.count(b'"server_tool_use"') >= 3
    )
    sent = sandbox.find(script="units_search")[-1]
    assert sent.body is not None and sent.body["tools"][1]["max_uses"] == 3
    assert "max_uses" not in sent.body["tools"][0]  # a client tool is left alone
    request = meter.requests[-1]
    assert request.usage.server_tool_use == {"web_search_requests": 3}
    assert request.cost_usd == tokens + 3 * Decimal("0.01")
    assert request.server_tool_uses_forwarded == {"web_search_requests": 3}
    # Reserved: the estimate and 3 uses' results at the dearest input price, 2000 output
    # tokens and 3 searches.
    prompt = request.input_tokens_estimate + 3 * SERVER_TOOL_RESULT_TOKENS
    assert request.reserved_usd == price.worst_case(prompt, 2000, uses={"web_search_requests": 3})

    # A max_uses above the cap is lowered to it; one below it is kept (here not streamed).
    status, _ = await _post(gateway, meter, _search_body("units_search", max_uses=50))
    assert status == 200
    assert sandbox.find(script="units_search")[-1].body["tools"][1]["max_uses"] == 3  # type: ignore[index]
    status, body = await _post(
        gateway, meter, _search_body("units_search", max_uses=2, stream=False)
    )
    assert status == 200 and body["usage"]["server_tool_use"]["web_search_requests"] == 2
    assert sandbox.find(script="units_search")[-1].body["tools"][1]["max_uses"] == 2  # type: ignore[index]
    assert meter.requests[-1].cost_usd == tokens + 2 * Decimal("0.01")
    assert meter.spent_usd == 2 * (tokens + Decimal("0.03")) + tokens + Decimal("0.02")
    assert meter.reserved_usd == 0 and meter.in_flight == 0
    gateway.close_session(meter.session_id)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_short_budget_lowers_max_uses_before_refusing(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    usage = Usage(1000, 100, 0, 0, {"web_search_requests": 8})
    sandbox.add_script("units_short", Script(steps=[Step(text="found", usage=usage)]))
    price = PRICES.price("claude-sonnet-4-5")
    # Each allowed use holds $0.01 and 10k tokens of results at $3.75/Mtok: $0.0475.
    meter = _open(gateway, sandbox, "0.15")
    status, _ = await _post(gateway, meter, _search_body("units_short"))
    assert status == 200
    request = meter.requests[-1]
    forwarded = request.server_tool_uses_forwarded["web_search_requests"]
    assert 1 <= forwarded < 8
    assert sandbox.find(script="units_short")[-1].body["tools"][1]["max_uses"] == forwarded  # type: ignore[index]
    assert request.reserved_usd <= Decimal("0.15")
    # One more use would not have left room for the smallest useful max_tokens (512).
    more = request.input_tokens_estimate + (forwarded + 1) * SERVER_TOOL_RESULT_TOKENS
    assert price.worst_case(more, 512, uses={"web_search_requests": forwarded + 1}) > Decimal(
        "0.15"
    )
    assert request.usage.server_tool_use == {"web_search_requests": forwarded}
    assert meter.spent_usd <= Decimal("0.15")

    # Too little for even one use: refused, nothing forwarded.
    poor = _open(gateway, sandbox, "0.03")
    before = len(sandbox.requests)
    status, body = await _post(gateway, poor, _search_body("units_short", stream=False))
    assert status == 400 and body["error"]["message"] == "session budget exhausted"
    assert poor.exhausted and len(sandbox.requests) == before
    for m in (meter, poor):
        gateway.close_session(m.session_id)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_server_tool_the_sessions_tools_do_not_allow_is_refused(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    meter = _open(gateway, sandbox, "5", tools=("Read", "WebFetch"))
    before = len(sandbox.requests)
    status, body = await _post(gateway, meter, _search_body("units_search", stream=False))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == (
        "tools: the server tool web_search_20250305 needs WebSearch among the session's tools"
    )
    assert len(sandbox.requests) == before  # never sent upstream
    assert meter.requests[-1].outcome == "refused" and meter.spent_usd == 0
    # Its WebFetch allows the web fetch server tool.
    fetch = _search_body("units_search", stream=False)
    fetch["tools"] = [{"type": "web_fetch_20250910", "name": "web_fetch"}]
    status, _ = await _post(gateway, meter, fetch)
    assert status == 200
    assert sandbox.requests[-1].body["tools"][0]["max_uses"] == 8  # type: ignore[index]
    gateway.close_session(meter.session_id)


@pytest.mark.asyncio(loop_scope="module")
async def test_an_unpriced_unit_is_metered_at_the_highest_price_with_a_warning(
    sandbox: SandboxServer, gateway: MeteringGateway, caplog: pytest.LogCaptureFixture
) -> None:
    usage = Usage(100, 10, 0, 0, {"code_execution_requests": 4})
    sandbox.add_script("units_unknown", Script(steps=[Step(text="ran", usage=usage)]))
    meter = _open(gateway, sandbox, "5")
    with caplog.at_level(logging.WARNING, logger="agentplane.server.gateway.proxy"):
        status, _ = await _post(gateway, meter, _search_body("units_unknown", stream=False))
    assert status == 200
    request = meter.requests[-1]
    assert request.usage.server_tool_use == {"code_execution_requests": 4}
    # Never at zero: at the table's highest per-use price ($0.01), with a warning.
    assert request.cost_usd == (100 * 3 + 10 * 15) / M + 4 * Decimal("0.01")
    warnings = [r.getMessage() for r in caplog.records if "has no price for" in r.getMessage()]
    assert warnings and "code_execution_requests x4" in warnings[0] and "0.01 USD" in warnings[0]
    gateway.close_session(meter.session_id)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_long_context_response_is_priced_at_the_premium(
    sandbox: SandboxServer, gateway: MeteringGateway
) -> None:
    usage = Usage(180_000, 2_000, 0, 40_000)
    sandbox.add_script("units_long", Script(steps=[Step(text="long", usage=usage)]))
    meter = _open(gateway, sandbox, "5")
    body = _search_body("units_long")
    del body["tools"]
    status, _ = await _post(gateway, meter, body)
    assert status == 200
    cost = (180_000 * 6 + 2_000 * Decimal("22.5") + 40_000 * Decimal("0.6")) / M
    assert meter.requests[-1].cost_usd == cost == Decimal("1.149")
    gateway.close_session(meter.session_id)
