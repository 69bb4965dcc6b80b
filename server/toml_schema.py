"""Tables of the tenants file, declared: each key once, with its parser, default and help.

A `Table` is a sequence of `Key`s and `Rule`s, read in order: each key's value (given, or
its default) goes through its parser; a rule checks values already read against each
other. The first problem is a ConfigError naming the key (`<where>.<key>: <reason>`), so
`check-config` names what to fix. The same declarations build the value (`Table.build`)
and the reference table of the docs (`Table.reference`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One key of a table."""

    name: str
    # The TOML value -> the value, or ValueError(the reason). A nested table's parser
    # (`nested`) is also given its place and the values read before it, `parse(value,
    # where, values)`, and raises ConfigError naming its own keys.
    parse: Callable[..., Any]
    default: Any  # the TOML value an absent key has (parsed like a given one)
    help: str  # Markdown, for the docs
    # Where the value goes in what `Table.build` makes: "" its name, "group.attribute"
    # an attribute of a group's value (e.g. "limits.memory_mib").
    to: str = ""
    nested: bool = False
    shown: str | None = None  # the default as the docs name it (else the TOML value)

    def read(self, raw: Mapping[str, Any], where: str, values: Mapping[str, Any]) -> Any:
        """The key's value in `raw` (a table, of which `values` are read), parsed;
        ConfigError naming `where.<key>`."""
        setting = f"{where}.{self.name}"
        value = raw.get(self.name, self.default)
        if self.nested:
            return self.parse(value, setting, values)
        try:
            return self.parse(value)
        except ValueError as exc:
            raise ConfigError(setting, str(exc)) from None

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        return f"`{toml_text(self.default)}`"


@dataclass(frozen=True)
class Rule:
    """A check across keys, run once the keys before it are read."""

    key: str  # the key a problem is reported on
    # (the values read so far, the raw table) -> the problem, or None.
    check: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class Table:
    """The keys and rules of one kind of table, in the order they are checked."""

    entries: tuple[Key | Rule, ...]

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple(e for e in self.entries if isinstance(e, Key))

    def read(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The values of `raw` by key name; ConfigError naming the first bad key."""
        unknown = set(raw) - {key.name for key in self.keys}
        if unknown:
            raise ConfigError(f"{where}.{min(unknown)}", "unknown setting")
        values: dict[str, Any] = {}
        for entry in self.entries:
            if isinstance(entry, Key):
                values[entry.name] = entry.read(raw, where, values)
                continue
            problem = entry.check(values, raw)
            if problem is not None:
                raise ConfigError(f"{where}.{entry.key}", problem)
        return values

    def build(self, values: Mapping[str, Any], groups: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the value `values` make: each key's value at its `to`,
        the grouped ones made by `groups[group](**attributes)`."""
        flat: dict[str, Any] = {}
        grouped: dict[str, dict[str, Any]] = {group: {} for group in groups}
        for key in self.keys:
            group, _, attribute = (key.to or key.name).rpartition(".")
            (grouped[group] if group else flat)[attribute] = values[key.name]
        return {**flat, **{group: groups[group](**grouped[group]) for group in groups}}

    def reference(self, prefix: str) -> str:
        """The docs' table of these keys: key, default (or required), meaning."""
        rows = ["| key | default | meaning |", "|---|---|---|"]
        rows += [f"| `{prefix}{k.name}` | {k.default_text} | {k.help} |" for k in self.keys]
        return "\n".join(rows) + "\n"


def toml_text(value: Any) -> str:
    """A value as the tenants file writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


# -- parsers: the TOML value -> the value, or ValueError(the reason) ------------------------


def positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"must be a positive integer, not {value!r}")
    return value


def count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"must be an integer >= 0, not {value!r}")
    return value


def text(value: Any, *, empty: bool = False) -> str | None:
    """A string (None: unset): any other type is refused, not turned into text."""
    if value is not None and (not isinstance(value, str) or not (empty or value.strip())):
        raise ValueError(f"must be a {'' if empty else 'non-empty '}string, not {value!r}")
    return value


def strings(what: str) -> Callable[[Any], list[str]]:
    """A list of non-blank strings (stripped); `what` says what they are."""

    def parse(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"must be a list of {what}")
        return [v.strip() for v in value]

    return parse


def bounded(parse: Callable[[Any], int], low: int, high: int, reason: str) -> Callable[[Any], int]:
    """`parse`, then `reason` unless low <= value <= high."""

    def check(value: Any) -> int:
        parsed = parse(value)
        if not low <= parsed <= high:
            raise ValueError(reason)
        return parsed

    return check


def mib(parse: Callable[[Any], int]) -> Callable[[Any], int]:
    """`parse` of a number of MiB, as bytes."""
    return lambda value: parse(value) << 20
