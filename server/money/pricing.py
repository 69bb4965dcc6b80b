"""The versioned price table: model id -> US dollars per million tokens (and, above a
model's long-context threshold, its premium), and per server-tool use.

The packaged table is ``prices.toml`` next to this module; an operator's file can replace
it (:meth:`PriceTable.load`) or override entries of it (:meth:`PriceTable.override`).
Prices are Decimals read straight from the TOML text (never through a float), costs are
exact Decimal arithmetic quantized to the micro-dollar, an unknown model raises
:class:`UnknownModel`, and a server-tool use a model has no price for is priced at the
highest price the table knows for it: nothing unknown is ever priced at zero.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from ..domain import MICRO, TokenUsage, usd
from ..errors import ConfigError, InvalidArgument

PER_TOKEN = Decimal(1_000_000)  # prices are per million tokens
_PRICE_KEYS = ("input", "output", "cache_write", "cache_read")
_OPTIONAL_KEYS = ("cache_write_1h",)
_SUFFIX = re.compile(r"-(\d{8}|latest)$")
_UNIT = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class UnknownModel(InvalidArgument):
    """A model the price table has no entry for (refused, never priced at zero)."""

    reason = "UNKNOWN_MODEL"  # still INVALID_ARGUMENT, with BadRequest on `model`

    def __init__(self, model: str, version: str, field: str = "model") -> None:
        super().__init__(
            field, f"model {model} is not in agentplane's price table (version {version})"
        )
        self.model = model
        self.version = version

    def __str__(self) -> str:
        return self.description


class PriceTableError(ConfigError):
    """A price file that cannot be used (names the file and the entry at fault)."""


@dataclass(frozen=True)
class Rates:
    """Token prices in US dollars per million tokens."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal
    cache_write_1h: Decimal

    def tokens(self, usage: TokenUsage) -> Decimal:
        """The price of ``usage``'s tokens, in US dollars per million (unquantized).

        The 1-hour share of the cache writes is priced at ``cache_write_1h``, the rest of
        ``cache_creation_input_tokens`` at ``cache_write`` (the share is capped at the
        writes, so an inconsistent report cannot make the rest negative).
        """
        writes_1h = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + (usage.cache_creation_input_tokens - writes_1h) * self.cache_write
            + writes_1h * self.cache_write_1h
            + usage.cache_read_input_tokens * self.cache_read
        )

    def input_worst(self, *, long_cache: bool = False) -> Decimal:
        """The most an input token can cost: base input or a cache write."""
        prices = [self.input, self.cache_write]
        if long_cache:
            prices.append(self.cache_write_1h)
        return max(prices)


@dataclass(frozen=True)
class LongContext:
    """A model's premium: a request with more than ``above_prompt_tokens`` input tokens
    (uncached, cache writes and cache reads together) is priced at ``rates`` whole."""

    above_prompt_tokens: int
    rates: Rates


@dataclass(frozen=True)
class ModelPrice:
    """One model's prices: tokens in US dollars per million, server tool uses per use.

    ``per_use`` holds the model's own price of each server-tool unit (the usage object's
    count names, e.g. ``web_search_requests``). A unit it has no price for is priced at
    ``fallback_use`` (the highest price the table has for that unit) or, for a unit the
    table does not know at all, ``fallback_unknown`` (its highest per-use price): never at
    zero. The table sets both fallbacks.
    """

    model: str  # the table entry (canonical id) these prices belong to
    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal
    cache_write_1h: Decimal
    version: str = ""  # the table's version
    long_context: LongContext | None = None
    per_use: Mapping[str, Decimal] = field(default_factory=dict)
    fallback_use: Mapping[str, Decimal] = field(default_factory=dict)
    fallback_unknown: Decimal = Decimal(0)

    @functools.cached_property
    def base_rates(self) -> Rates:
        return Rates(
            self.input, self.output, self.cache_write, self.cache_read, self.cache_write_1h
        )

    def rates(self, prompt_tokens: int) -> Rates:
        """The token prices of a request with ``prompt_tokens`` input tokens (the
        long-context premium's above its threshold, else the base prices)."""
        premium = self.long_context
        if premium is not None and prompt_tokens > premium.above_prompt_tokens:
            return premium.rates
        return self.base_rates

    def use_price(self, unit: str) -> Decimal:
        """The price of one server-tool use of ``unit`` (see the class docstring)."""
        if unit in self.per_use:
            return self.per_use[unit]
        return self.fallback_use.get(unit, self.fallback_unknown)

    def unpriced_units(self, usage: TokenUsage) -> list[str]:
        """The server-tool units of ``usage`` this model has no price of its own for
        (they are priced by the fallbacks; worth a warning)."""
        return sorted(unit for unit in usage.server_tool_use if unit not in self.per_use)

    def cost(self, usage: TokenUsage) -> Decimal:
        """The exact cost of one response's ``usage``, quantized to the micro-dollar:
        its tokens at the rates of its size (:meth:`rates`) plus its server-tool uses."""
        total = self.rates(usage.prompt_tokens).tokens(usage)
        if usage.server_tool_use:
            total += PER_TOKEN * self._uses_cost(usage.server_tool_use)
        return usd(total / PER_TOKEN)

    def _uses_cost(self, uses: Mapping[str, int] | None) -> Decimal:
        if not uses:
            return Decimal(0)
        return sum((count * self.use_price(unit) for unit, count in uses.items()), Decimal(0))

    def worst_case(
        self,
        input_tokens_estimate: int,
        max_tokens: int,
        *,
        long_cache: bool = False,
        uses: Mapping[str, int] | None = None,
    ) -> Decimal:
        """The most a request can cost: every input token written to the cache and
        ``max_tokens`` of output, at the rates of a request of that size, plus ``uses``
        server-tool uses by unit; rounded up to the micro-dollar."""
        rates = self.rates(input_tokens_estimate)
        total = (
            input_tokens_estimate * rates.input_worst(long_cache=long_cache)
            + max_tokens * rates.output
            + PER_TOKEN * self._uses_cost(uses)
        )
        return (total / PER_TOKEN).quantize(MICRO, rounding=ROUND_CEILING)

    def max_output_tokens(
        self,
        budget_usd: Decimal,
        input_tokens_estimate: int,
        *,
        long_cache: bool = False,
        uses: Mapping[str, int] | None = None,
    ) -> int:
        """The largest ``max_tokens`` whose :meth:`worst_case` fits ``budget_usd`` (>= 0)."""
        rates = self.rates(input_tokens_estimate)
        left = (
            Decimal(budget_usd) - self._uses_cost(uses)
        ) * PER_TOKEN - input_tokens_estimate * rates.input_worst(long_cache=long_cache)
        if left <= 0:
            return 0
        tokens = math.floor(left / rates.output)
        # worst_case rounds up to the micro-dollar: step down until it fits.
        while (
            tokens > 0
            and self.worst_case(input_tokens_estimate, tokens, long_cache=long_cache, uses=uses)
            > budget_usd
        ):
            tokens -= 1
        return tokens


class PriceTable:
    """Model prices of one version. Look models up with :meth:`price`."""

    def __init__(
        self,
        version: str,
        models: Mapping[str, ModelPrice],
        aliases: Mapping[str, str] | None = None,
        source: str = "",
    ) -> None:
        self.version = version
        self.models: dict[str, ModelPrice] = _with_fallbacks(models)
        self.aliases: dict[str, str] = dict(aliases or {})
        self.source = source

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PriceTable:
        """Load a price file; ``None`` loads the table packaged with agentplane."""
        if path is None:
            resource = resources.files(__package__).joinpath("prices.toml")
            return cls.from_toml(resource.read_text(encoding="utf-8"), source="prices.toml")
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise PriceTableError(str(file), f"cannot read the price file: {exc}") from exc
        return cls.from_toml(text, source=str(file))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> PriceTable:
        """Parse and validate a price table's TOML text."""
        try:
            data = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as exc:
            raise PriceTableError(source, f"not valid TOML: {exc}") from exc
        unknown = set(data) - {"version", "models", "aliases", "per_use"}
        if unknown:
            raise PriceTableError(source, f"unknown top-level key(s): {', '.join(sorted(unknown))}")
        version = data.get("version")
        if not isinstance(version, str) or not version.strip():
            raise PriceTableError(source, "needs a non-empty string `version`")
        models_data = data.get("models", {})
        if not isinstance(models_data, dict):
            raise PriceTableError(source, "`models` must be a table of model id -> prices")
        # The file's [per_use] prices every model of the file; a model's own overrides it.
        per_use = _per_use(source, "per_use", data.get("per_use", {}))
        models = {
            model: _model_price(source, version, model, entry, per_use)
            for model, entry in models_data.items()
        }
        aliases = data.get("aliases", {})
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise PriceTableError(source, "`aliases` must be a table of name -> model id")
        table = cls(version, models, aliases, source)
        table._check_aliases()
        return table

    def override(self, path: str | os.PathLike[str]) -> PriceTable:
        """A new table: this one with the models and aliases of the file at ``path`` added
        or replaced (whole entries). Its version reads ``<this>+<the file's version>``."""
        other = PriceTable.load(path)
        version = f"{self.version}+{other.version}"
        models = {
            name: _with_version(price, version)
            for name, price in {**self.models, **other.models}.items()
        }
        table = PriceTable(
            version,
            models,
            {**self.aliases, **other.aliases},
            source=f"{self.source}+{other.source}",
        )
        table._check_aliases()
        return table

    def _check_aliases(self) -> None:
        for alias, target in self.aliases.items():
            if target not in self.models:
                raise PriceTableError(
                    self.source, f"alias {alias!r} names {target!r}, which has no prices"
                )

    # -- lookup ----------------------------------------------------------------------

    def resolve(self, model: str) -> str | None:
        """The table entry ``model`` is priced by, or None.

        Exact id, then an alias, then the id without a trailing ``-YYYYMMDD`` or
        ``-latest`` (a dated id falls back to its undated family entry).
        """
        candidates = [model]
        base = _SUFFIX.sub("", model)
        if base != model:
            candidates.append(base)
        for name in candidates:
            if name in self.models:
                return name
            if name in self.aliases:
                return self.aliases[name]
        return None

    def price(self, model: str) -> ModelPrice:
        """The prices for ``model``; raises :class:`UnknownModel` when there are none."""
        name = self.resolve(model) if isinstance(model, str) else None
        if name is None:
            raise UnknownModel(str(model), self.version)
        return self.models[name]

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.resolve(model) is not None

    def __repr__(self) -> str:
        return f"PriceTable(version={self.version!r}, models={len(self.models)})"


def _with_version(price: ModelPrice, version: str) -> ModelPrice:
    return replace(price, version=version)


def _with_fallbacks(models: Mapping[str, ModelPrice]) -> dict[str, ModelPrice]:
    """``models`` with the table's fallback per-use prices set on each (see ModelPrice)."""
    highest: dict[str, Decimal] = {}
    for price in models.values():
        for unit, amount in price.per_use.items():
            highest[unit] = max(highest.get(unit, amount), amount)
    unknown = max(highest.values(), default=Decimal(0))
    return {
        name: replace(price, fallback_use=highest, fallback_unknown=unknown)
        for name, price in models.items()
    }


def _number(source: str, where: str, value: Any, *, positive: bool = True) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise PriceTableError(source, f"{where} must be a number, got {value!r}")
    price = Decimal(value)
    if not price.is_finite() or price < 0 or (positive and price == 0):
        raise PriceTableError(
            source, f"{where} must be {'> 0' if positive else '>= 0'}, got {value}"
        )
    return price


def _rates(source: str, where: str, entry: dict[str, Any], extra: set[str]) -> dict[str, Decimal]:
    unknown = set(entry) - {*_PRICE_KEYS, *_OPTIONAL_KEYS, *extra}
    if unknown:
        raise PriceTableError(source, f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    missing = [key for key in _PRICE_KEYS if key not in entry]
    if missing:
        raise PriceTableError(source, f"{where}: missing price(s) {', '.join(missing)}")
    prices = {
        key: _number(source, f"{where}.{key}", entry[key])
        for key in (*_PRICE_KEYS, *_OPTIONAL_KEYS)
        if key in entry
    }
    prices.setdefault("cache_write_1h", 2 * prices["input"])
    return prices


def _per_use(source: str, where: str, entry: Any) -> dict[str, Decimal]:
    """A table of server-tool unit -> US dollars per use (>= 0: some are free)."""
    if not isinstance(entry, dict):
        raise PriceTableError(source, f"{where} must be a table of usage count name -> price")
    for unit in entry:
        if not _UNIT.match(unit):
            raise PriceTableError(
                source, f"{where}: {unit!r} is not a usage count name (like web_search_requests)"
            )
    return {
        unit: _number(source, f"{where}.{unit}", value, positive=False)
        for unit, value in entry.items()
    }


def _long_context(source: str, where: str, entry: Any) -> LongContext:
    if not isinstance(entry, dict):
        raise PriceTableError(source, f"{where} must be a table of prices")
    threshold = entry.get("above_prompt_tokens")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise PriceTableError(
            source, f"{where}.above_prompt_tokens must be a positive integer, got {threshold!r}"
        )
    prices = _rates(source, where, entry, {"above_prompt_tokens"})
    return LongContext(threshold, Rates(**prices))


def _model_price(
    source: str,
    version: str,
    model: str,
    entry: Any,
    per_use: Mapping[str, Decimal] | None = None,
) -> ModelPrice:
    where = f"models.{model!r}"
    if not isinstance(entry, dict):
        raise PriceTableError(source, f"{where} must be a table of prices")
    prices = _rates(source, where, entry, {"long_context", "per_use"})
    long_context = (
        _long_context(source, f"{where}.long_context", entry["long_context"])
        if "long_context" in entry
        else None
    )
    own = _per_use(source, f"{where}.per_use", entry.get("per_use", {}))
    return ModelPrice(
        model=model,
        input=prices["input"],
        output=prices["output"],
        cache_write=prices["cache_write"],
        cache_read=prices["cache_read"],
        cache_write_1h=prices["cache_write_1h"],
        version=version,
        long_context=long_context,
        per_use={**(per_use or {}), **own},
    )
