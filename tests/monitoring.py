"""deploy/'s Grafana dashboard and Prometheus alert rules, as the tests read them: their
queries, and the metric names each query reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "agentplane-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "agentplane-alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "agentplane-alerts.test.yaml"
# What Grafana puts in place of its variables, for promtool to parse a panel's query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$tenant": ".*",
    "$job": ".*",
}

_FUNCTIONS_AND_KEYWORDS = {
    *("sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile"),
    *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"),
    *("unless", "offset", "clamp_min", "clamp_max", "abs", "time", "vector", "scalar"),
    *("absent", "topk", "bottomk", "sort", "sort_desc", "label_values", "changes", "delta"),
    *("avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "le", "inf", "nan"),
}
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's variables left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+(:\w+)?\}?", "", expr)  # $tenant, ${DS}, $__rate_interval
    expr = re.sub(r"label_values\(([^,()]*),[^)]*\)", r"(\1)", expr)  # its label
    # Numbers and durations (0.9, 1e3, offset 1d).
    expr = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?(ms|[smhdwy])?", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        rest = expr[match.end() :].lstrip()
        if word.lower() not in _FUNCTIONS_AND_KEYWORDS and not rest.startswith("("):
            names.add(word)
    return names


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too (rows themselves included)."""
    found: list[dict[str, Any]] = []

    def walk(items: list[dict[str, Any]]) -> None:
        for panel in items:
            found.append(panel)
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and templating query."""
    found = [
        (str(panel.get("title")), target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query["query"] if isinstance(query, dict) else query
            found.append((f"${variable['name']}", text))
    return found


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def as_promql(expr: str) -> str:
    """A panel's query with Grafana's variables replaced (see GRAFANA_VARIABLES)."""
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    return expr
