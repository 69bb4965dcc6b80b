"""The versioned price table: model id -> US dollars per million tokens.

The packaged table is ``prices.toml`` next to this module; an operator's file can replace
it (:meth:`PriceTable.load`) or override entries of it (:meth:`PriceTable.override`).
Prices are Decimals read straight from the TOML text (never through a float), costs are
exact Decimal arithmetic quantized to the micro-dollar, and an unknown model raises
:class:`UnknownModel`: nothing is ever priced at zero.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
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
class ModelPrice:
    """One model's prices in US dollars per million tokens."""

    model: str  # the table entry (canonical id) these prices belong to
    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal
    cache_write_1h: Decimal
    version: str = ""  # the table's version

    def cost(self, usage: TokenUsage) -> Decimal:
        """The exact cost of one response's ``usage``, quantized to the micro-dollar.

        The 1-hour share of the cache writes is priced at ``cache_write_1h``, the rest of
        ``cache_creation_input_tokens`` at ``cache_write`` (the share is capped at the
        writes, so an inconsistent report cannot make the rest negative).
        """
        writes_1h = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
        total = (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + (usage.cache_creation_input_tokens - writes_1h) * self.cache_write
            + writes_1h * self.cache_write_1h
            + usage.cache_read_input_tokens * self.cache_read
        )
        return usd(total / PER_TOKEN)

    def input_worst_price(self, *, long_cache: bool = False) -> Decimal:
        """The most an input token can cost: base input or a cache write."""
        prices = [self.input, self.cache_write]
        if long_cache:
            prices.append(self.cache_write_1h)
        return max(prices)

    def worst_case(
        self, input_tokens_estimate: int, max_tokens: int, *, long_cache: bool = False
    ) -> Decimal:
        """The most a request can cost: every input token written to the cache and
        ``max_tokens`` of output, rounded up to the micro-dollar."""
        total = (
            input_tokens_estimate * self.input_worst_price(long_cache=long_cache)
            + max_tokens * self.output
        )
        return (total / PER_TOKEN).quantize(MICRO, rounding=ROUND_CEILING)

    def max_output_tokens(
        self, budget_usd: Decimal, input_tokens_estimate: int, *, long_cache: bool = False
    ) -> int:
        """The largest ``max_tokens`` whose :meth:`worst_case` fits ``budget_usd`` (>= 0)."""
        left = Decimal(budget_usd) * PER_TOKEN - input_tokens_estimate * self.input_worst_price(
            long_cache=long_cache
        )
        if left <= 0:
            return 0
        tokens = math.floor(left / self.output)
        # worst_case rounds up to the micro-dollar: step down until it fits.
        while (
            tokens > 0
            and self.worst_case(input_tokens_estimate, tokens, long_cache=long_cache) > budget_usd
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
        self.models: dict[str, ModelPrice] = dict(models)
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
        unknown = set(data) - {"version", "models", "aliases"}
        if unknown:
            raise PriceTableError(source, f"unknown top-level key(s): {', '.join(sorted(unknown))}")
        version = data.get("version")
        if not isinstance(version, str) or not version.strip():
            raise PriceTableError(source, "needs a non-empty string `version`")
        models_data = data.get("models", {})
        if not isinstance(models_data, dict):
            raise PriceTableError(source, "`models` must be a table of model id -> prices")
        models = {
            model: _model_price(source, version, model, entry)
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
    return ModelPrice(
        model=price.model,
        input=price.input,
        output=price.output,
        cache_write=price.cache_write,
        cache_read=price.cache_read,
        cache_write_1h=price.cache_write_1h,
        version=version,
    )


def _model_price(source: str, version: str, model: str, entry: Any) -> ModelPrice:
    where = f"models.{model!r}"
    if not isinstance(entry, dict):
        raise PriceTableError(source, f"{where} must be a table of prices")
    unknown = set(entry) - {*_PRICE_KEYS, *_OPTIONAL_KEYS}
    if unknown:
        raise PriceTableError(source, f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    missing = [key for key in _PRICE_KEYS if key not in entry]
    if missing:
        raise PriceTableError(source, f"{where}: missing price(s) {', '.join(missing)}")
    prices: dict[str, Decimal] = {}
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise PriceTableError(source, f"{where}.{key} must be a number, got {value!r}")
        price = Decimal(value)
        if not price.is_finite() or price <= 0:
            raise PriceTableError(source, f"{where}.{key} must be > 0, got {value}")
        prices[key] = price
    prices.setdefault("cache_write_1h", 2 * prices["input"])
    return ModelPrice(model=model, version=version, **prices)
