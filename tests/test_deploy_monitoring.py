"""deploy/'s monitoring: the alert rules pass `promtool check rules` and their own unit
tests (`promtool test rules`), every dashboard query is PromQL promtool parses, the
dashboard is a well-formed Grafana dashboard, and kubernetes.yaml wires /metrics and
OTLP. (That the queries name only metrics /metrics lists: test_operator_metrics.py.)

promtool comes from Debian's `prometheus` package (scripts/install_promtool.sh, which
.ci/run runs); without it these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentplane.server.config import Settings
from monitoring import (
    ALERT_TESTS,
    ALERTS,
    DEPLOY,
    alert_queries,
    as_promql,
    dashboard_panels,
    dashboard_queries,
    load_dashboard,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool with `args` (skips, or fails in CI, when it is not installed)."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found: scripts/install_promtool.sh installs it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run([path, *args], check=False, capture_output=True, text=True, timeout=120)


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_queries())} rules found" in checked.stdout


def test_the_alert_rules_pass_their_unit_tests() -> None:
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a test that makes it fire.
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == {name for name, _ in alert_queries()}


def test_promtool_fails_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule whose query does not parse is refused."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum by (tenant ("}]}]}
        )
    )
    checked = promtool("check", "rules", str(broken))
    assert checked.returncode != 0


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    queries = dashboard_queries(load_dashboard())
    panel_queries = [(where, expr) for where, expr in queries if not where.startswith("$")]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
                    for i, (_, expr) in enumerate(panel_queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for i, a in enumerate(panels):
        grid = a["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, a["title"]
        for b in panels[i + 1 :]:
            assert not _overlap(grid, b["gridPos"]), (a["title"], b["title"])
        if a["type"] == "row":
            continue
        assert a["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, a["title"]
        targets: list[dict[str, Any]] = a["targets"]
        assert targets, f"{a['title']} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), a["title"]
        assert all(t["expr"].strip() for t in targets), a["title"]


def _deployment() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment


def test_kubernetes_wires_prometheus_and_otlp() -> None:
    template = _deployment()["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert int(env["AGENTPLANE_PROMETHEUS_PORT"]) == ports["metrics"]
    # The telemetry settings as the server reads them (a value it refuses fails here).
    telemetry = {
        k: v
        for k, v in env.items()
        if v is not None and (k.startswith("OTEL_") or k == "AGENTPLANE_PROMETHEUS_PORT")
    }
    settings = Settings.from_env({**telemetry, "AGENTPLANE_LISTEN": "0.0.0.0:50051"})
    assert settings.prometheus_address == ("0.0.0.0", ports["metrics"])
    assert settings.otel.traces_endpoint == env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert settings.otel.metrics_exporters == ()  # scraped, not pushed too
