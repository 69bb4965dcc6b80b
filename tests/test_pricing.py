"""The versioned price table: exact costs, lookups, overrides, and the packaged file."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from agentplane.server.domain import TokenUsage
from agentplane.server.errors import InvalidArgument
from agentplane.server.money.pricing import ModelPrice, PriceTable, PriceTableError, UnknownModel

TABLE = PriceTable.load()

# What the bundled CLI (2.1.331) sends: with no model, "opus"/"default" -> opus 5.5,
# "sonnet" -> sonnet 5.5, "haiku" -> haiku 5.5; full ids (and dated ones) as given,
# except retired Opus 4.0/4.1 ids, which it replaces by opus 5.5.
CLI_MODELS = [
    "claude-opus-5-5",
    "claude-sonnet-5-5",
    "claude-haiku-5-5",
    "claude-opus-4-5",
    "claude-opus-4-6",
    "claude-opus-4-7",
    "claude-opus-4-8",
    "claude-opus-5",
    "claude-sonnet-4",
    "claude-sonnet-4-5",
    "claude-sonnet-4-6",
    "claude-sonnet-5",
    "claude-haiku-4-5",
    "claude-opus-4-5-20251101",
    "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-20250514",
    "claude-haiku-4-5-20251001",
    "claude-sonnet-4-0",
]


def test_exact_cost_of_a_usage() -> None:
    price = TABLE.price("claude-sonnet-4-5")
    assert (price.input, price.output, price.cache_write, price.cache_read) == (
        Decimal(3),
        Decimal(15),
        Decimal("3.75"),
        Decimal("0.30"),
    )
    usage = TokenUsage(
        input_tokens=1000,
        output_tokens=200,
        cache_creation_input_tokens=300,
        cache_read_input_tokens=400,
    )
    # 1000*3 + 200*15 + 300*3.75 + 400*0.30 = 7245 micro-dollars.
    cost = price.cost(usage)
    assert cost == Decimal("0.007245") and isinstance(cost, Decimal)
    assert cost.as_tuple().exponent == -6
    # The API's usage dict gives the same; a 1-hour cache write is priced at 2x input.
    api_usage = {
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 400,
        "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
        "service_tier": "standard",
    }
    assert (
        price.cost(TokenUsage.from_api(api_usage))
        == Decimal("0.007245") + Decimal(100) * (6 - Decimal("3.75")) / 10**6
    )
    # Quantized to the micro-dollar (half-even): 3 cache-read tokens are 0.9 micro-dollars.
    assert price.cost(TokenUsage(cache_read_input_tokens=3)) == Decimal("0.000001")
    assert price.cost(TokenUsage()) == Decimal("0.000000")
    # Large numbers stay exact.
    assert TABLE.price("claude-opus-4-5").cost(
        TokenUsage(input_tokens=123_456_789, output_tokens=987_654_321)
    ) == Decimal("25308.641970")  # 617283945 + 24691358025 micro-dollars


def test_worst_case_and_max_output_tokens() -> None:
    price = TABLE.price("claude-opus-4-5")  # 5 in, 25 out, 6.25 cache write
    assert price.worst_case(1000, 2000) == Decimal("0.05625")  # 1000*6.25 + 2000*25
    budget = Decimal("0.1")
    n = price.max_output_tokens(budget, 1402)
    assert price.worst_case(1402, n) <= budget < price.worst_case(1402, n + 1)
    assert n == 3649
    assert isinstance(n, int)
    assert price.max_output_tokens(Decimal("0.006"), 1000) == 0  # input alone is 0.00625
    assert price.max_output_tokens(Decimal(0), 0) == 0
    assert price.max_output_tokens(Decimal("0.000025"), 0) == 1
    # A 1-hour cache TTL makes the dearest input token cost 2x input.
    assert price.worst_case(1000, 0, long_cache=True) == Decimal("0.01")


def test_dated_ids_and_aliases_fall_back_to_their_family() -> None:
    assert TABLE.price("claude-sonnet-4-5-20250929") is TABLE.price("claude-sonnet-4-5")
    assert TABLE.price("claude-haiku-4-5-20251001").model == "claude-haiku-4-5"
    assert TABLE.price("claude-opus-4-20250514").model == "claude-opus-4"
    assert TABLE.price("claude-opus-4-1-20250805").model == "claude-opus-4-1"
    assert TABLE.price("claude-3-7-sonnet-latest").model == "claude-3-7-sonnet"
    assert TABLE.price("claude-sonnet-4-0").model == "claude-sonnet-4"
    assert TABLE.price("sonnet").model == "claude-sonnet-5-5"
    assert TABLE.resolve("claude-sonnet-4-5-2025") is None  # not a date
    assert "claude-sonnet-4-5-20250929" in TABLE and "claude-fable-9" not in TABLE


@pytest.mark.parametrize("model", ["claude-fable-9", "claude-fable-9-20260101", "", "gpt-4o"])
def test_unknown_model_is_refused_with_a_clear_message(model: str) -> None:
    with pytest.raises(UnknownModel) as caught:
        TABLE.price(model)
    message = f"model {model} is not in agentplane's price table (version 2026-12-08)"
    assert str(caught.value) == message
    assert caught.value.model == model and caught.value.version == "2026-12-08"
    # A domain error the API layer maps to INVALID_ARGUMENT on the `model` field.
    assert isinstance(caught.value, InvalidArgument) and caught.value.field == "model"


def test_every_model_has_four_positive_prices() -> None:
    assert TABLE.version == "2026-12-08"
    assert len(TABLE.models) >= 15
    for name, price in TABLE.models.items():
        assert isinstance(price, ModelPrice) and price.model == name
        for value in (price.input, price.output, price.cache_write, price.cache_read):
            assert isinstance(value, Decimal) and value > 0, name
        assert price.cache_write_1h == 2 * price.input
        assert price.output > price.input > price.cache_read, name
        assert price.version == TABLE.version
    for model in CLI_MODELS:
        assert model in TABLE, model


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_override_file(tmp_path: Path) -> None:
    override = _write(
        tmp_path / "acme.toml",
        """
        version = "acme-7"
        [models."claude-sonnet-4-5"]   # a negotiated price
        input = 2.5
        output = 12.5
        cache_write = 3.125
        cache_read = 0.25
        [models."claude-private-1"]
        input = 1
        output = 2
        cache_write = 1.25
        cache_read = 0.1
        cache_write_1h = 1.5
        [aliases]
        "private" = "claude-private-1"
        """,
    )
    table = TABLE.override(override)
    assert table.version == "2026-12-08+acme-7"
    sonnet = table.price("claude-sonnet-4-5-20250929")
    assert (sonnet.input, sonnet.output) == (Decimal("2.5"), Decimal("12.5"))
    assert sonnet.version == "2026-12-08+acme-7"
    assert table.price("private").cache_write_1h == Decimal("1.5")
    opus = TABLE.price("claude-opus-4-5")
    assert table.price("claude-opus-4-5") == replace(opus, version=table.version)
    assert table.price("sonnet").model == "claude-sonnet-5-5"  # packaged aliases kept
    assert TABLE.price("claude-sonnet-4-5").input == Decimal("3.0")  # the base is unchanged
    with pytest.raises(UnknownModel, match=r"\(version 2026-12-08\+acme-7\)"):
        table.price("claude-fable-9")

    # load(path) replaces the packaged table entirely.
    alone = PriceTable.load(override)
    assert alone.version == "acme-7" and set(alone.models) == {
        "claude-sonnet-4-5",
        "claude-private-1",
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            'version = "x"\n[models.m]\ninput = 0\noutput = 1\ncache_write = 1\ncache_read = 1\n',
            "must be > 0",
        ),
        (
            'version = "x"\n[models.m]\ninput = 1\noutput = 1\ncache_write = 1\n',
            "missing price(s) cache_read",
        ),
        (
            (
                'version = "x"\n[models.m]\ninput = 1\noutput = 1\ncache_write = 1\ncache_read = 1\n'
                "cache_raed = 1\n"
            ),
            "unknown key(s) cache_raed",
        ),
        (
            'version = "x"\n[models.m]\ninput = "1"\noutput = 1\ncache_write = 1\ncache_read = 1\n',
            "must be a number",
        ),
        ('version = "x"\n[aliases]\na = "nothing"\n', "alias 'a' names 'nothing'"),
        ("[models]\n", "non-empty string `version`"),
        ('version = "x"\nmodel = 1\n', "unknown top-level key(s): model"),
        ("version = ", "not valid TOML"),
    ],
)
def test_invalid_price_files_are_rejected(tmp_path: Path, text: str, problem: str) -> None:
    path = _write(tmp_path / "bad.toml", text)
    with pytest.raises(PriceTableError) as caught:
        TABLE.override(path)
    assert problem in str(caught.value) and str(path) in str(caught.value)


def test_missing_price_file(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError, match="cannot read the price file"):
        PriceTable.load(tmp_path / "nope.toml")
