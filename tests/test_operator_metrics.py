"""What an operator's Prometheus scrapes: a real server with AGENTPLANE_PROMETHEUS_PORT on
loopback, its /metrics read as Prometheus reads it.

Every family the dashboard and the alert rules use is listed right after start (zeros
for every tenant, state and dependency, not absent); after sessions the values match
the database: cost per tenant and model, model requests by status and outcome, sessions
by state and by how they ended, each tenant's budget; the dashboard's and the rules'
queries name only metrics /metrics lists.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplane.server.domain import BudgetWindow, SessionState, utcnow
from agentplane.server.health import Health
from agentplane.server.model_double import HttpFailure, Script, Step, ToolCall
from agentplane.server.money.windows import day_of
from agentplane.server.store.engine import create_engine
from agentplane.server.store.models import (
    BudgetWindowRow,
    ModelRequestRow,
    SessionInputRow,
    SessionRow,
)
from agentplane.server.telemetry.gauges import Occupancy, ServerGauges, Sources
from agentplane.server.telemetry.otel_env import OtelConfig
from agentplane.server.telemetry.setup import Telemetry
from agentplane.v1 import session_pb2
from google.protobuf.duration_pb2 import Duration
from harness import MODEL, Harness, collect, error_details, start_harness, stop_harness, tenant_toml
from monitoring import SUFFIXES, alert_queries, dashboard_queries, load_dashboard, metric_names
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

WAITER_TOKEN = "waiter-token-9"
# Its whole day fits one session: while one waits for its caller, another is refused.
WAITER = tenant_toml(
    "waiter",
    WAITER_TOKEN,
    anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
    allowed_tools=["Read"],
    daily_limit_usd=1.0,
    max_session_budget_usd=1.0,
    max_turns=4,
)

# The families an operator's dashboard and alerts rely on (Prometheus names), by type.
FAMILIES = {
    "agentplane_capacity_limit": "gauge",
    "agentplane_capacity_used": "gauge",
    "agentplane_sessions_live": "gauge",
    "agentplane_warm_pool_idle": "gauge",
    "agentplane_sessions_started": "counter",
    "agentplane_sessions_ended": "counter",
    "agentplane_admission_rejections": "counter",
    "agentplane_cost_usd": "counter",
    "agentplane_model_requests": "counter",
    "agentplane_budget_limit_usd": "gauge",
    "agentplane_budget_spent_usd": "gauge",
    "agentplane_budget_reserved_usd": "gauge",
    "agentplane_budget_remaining_usd": "gauge",
    "agentplane_ready": "gauge",
    "db_client_connection_count": "gauge",
    "db_client_connection_max": "gauge",
    "gen_ai_client_token_usage": "histogram",
    "gen_ai_client_operation_duration_seconds": "histogram",
    "gen_ai_client_operation_time_to_first_chunk_seconds": "histogram",
    "grpc_server_call_started": "counter",
    "grpc_server_call_duration_seconds": "histogram",
}
DEPENDENCIES = ("server", "database", "agent_cli", "model_api", "sandbox", "tenants_file")
LIVE_STATES = ("starting", "running", "awaiting_caller")


@dataclass
class Scrape:
    """One /metrics read: families by name, samples by name."""

    types: dict[str, str]
    samples: dict[str, list[tuple[dict[str, str], float]]]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        return sum(v for found, v in self.samples.get(name, []) if labels.items() <= found.items())

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """The samples of `name` summed by the values of `keys` (zeros left out)."""
        sums: dict[tuple[str, ...], float] = {}
        for labels, v in self.samples.get(name, []):
            key = tuple(labels.get(k, "") for k in keys)
            sums[key] = sums.get(key, 0.0) + v
        return {k: v for k, v in sums.items() if v}

    def label_values(self, name: str, key: str) -> set[str]:
        return {labels[key] for labels, _ in self.samples.get(name, []) if key in labels}


def scrape(h: Harness) -> Scrape:
    endpoint = h.app.telemetry.prometheus
    assert endpoint is not None
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if not k.startswith("otel_scope")}
            samples.setdefault(s.name, []).append((labels, s.value))
    return Scrape(types, samples)


async def read_scrape(h: Harness) -> Scrape:
    return await asyncio.to_thread(scrape, h)


async def eventually(h: Harness, check: Callable[[Scrape], None], timeout: float = 60) -> None:
    """Scrape until `check` passes (the budget gauges follow a change within a second);
    its last failure is raised at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await read_scrape(h)
        try:
            check(found)
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def served(database_url: str) -> AsyncIterator[Harness]:
    # The CLI retries the model API's 429s itself here (the harness turns that off).
    h = await start_harness(
        database_url, extra_tenants=WAITER, prometheus_port=0, cli_max_retries=2
    )
    yield h
    await stop_harness(h)


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    if tenant == "waiter":
        return (("authorization", f"Bearer {WAITER_TOKEN}"),)
    return Harness.auth(tenant)


async def test_every_family_is_listed_from_the_start(served: Harness) -> None:
    h = served
    found = await read_scrape(h)
    for name, kind in FAMILIES.items():
        assert found.types.get(name) == kind, f"{name} missing or not a {kind} at start"
    declared = [d.name for d in h.app.telemetry.declarations]
    assert len(declared) >= len(FAMILIES)
    tenants = h.app.tenants.tenants
    for name, tenant in tenants.items():
        for state in LIVE_STATES:
            assert ("agentplane_sessions_live", name, state) and (
                found.samples["agentplane_sessions_live"].count(
                    ({"tenant": name, "state": state}, 0.0)
                )
                == 1
            )
        assert found.value("agentplane_budget_limit_usd", tenant=name) == float(
            tenant.daily_limit_usd
        )
        for gauge in ("spent", "reserved"):
            assert ({"tenant": name}, 0.0) in found.samples[f"agentplane_budget_{gauge}_usd"]
        assert ({"tenant": name}, 0.0) in found.samples["agentplane_sessions_started_total"]
        assert ({"tenant": name}, 0.0) in found.samples["agentplane_warm_pool_idle"]
        for reason in ("BUDGET_EXCEEDED", "CONCURRENCY_LIMIT", "REPLICA_FULL"):
            assert (
                {"tenant": name, "reason": reason},
                0.0,
            ) in found.samples["agentplane_admission_rejections_total"]
        assert (
            {"tenant": name, "outcome": "ERROR", "reason": "MODEL_API_ERROR"},
            0.0,
        ) in found.samples["agentplane_sessions_ended_total"]
    assert found.value("agentplane_capacity_limit") == h.app.settings.max_sessions
    assert found.by("agentplane_capacity_used", "holder") == {}  # all zero
    assert found.label_values("agentplane_capacity_used", "holder") == {
        "session",
        "admitting",
        "warm_agent",
    }
    for dependency in DEPENDENCIES:
        assert found.value("agentplane_ready", dependency=dependency) == 1, dependency
    for pool in ("main", "upkeep"):
        assert found.value("db_client_connection_max", db_client_connection_pool_name=pool) > 0
        assert found.label_values("db_client_connection_count", "db_client_connection_state") == {
            "used",
            "idle",
        }
    # A histogram never observed is there, as zero.
    assert found.value("gen_ai_client_operation_duration_seconds_count") == 0
    assert found.value("grpc_server_call_duration_seconds_count") == 0


async def _session_rows(h: Harness) -> list[SessionRow]:
    async with AsyncSession(h.app.engine) as db:
        return list((await db.scalars(select(SessionRow))).all())


async def _request_rows(h: Harness) -> list[ModelRequestRow]:
    async with AsyncSession(h.app.engine) as db:
        return list((await db.scalars(select(ModelRequestRow))).all())


async def _pending_inputs(h: Harness) -> int:
    async with AsyncSession(h.app.engine) as db:
        rows = (await db.scalars(select(SessionInputRow))).all()
    return sum(1 for row in rows if row.resolved_at is None)


async def _windows_today(h: Harness) -> dict[str, BudgetWindowRow]:
    now = utcnow()
    async with AsyncSession(h.app.engine) as db:
        rows = (await db.scalars(select(BudgetWindowRow))).all()
    tenants = h.app.tenants.tenants
    return {
        row.tenant: row
        for row in rows
        if row.tenant in tenants
        and row.day == day_of(now, tenants[row.tenant].time_zone).isoformat()
    }


def _usd(value: float) -> Decimal:
    return Decimal(str(round(value, 6)))


async def test_a_session_waiting_for_its_caller_and_a_refusal(served: Harness) -> None:
    h = served
    h.sandbox.add_script(
        "metrics_wait",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "x"})]),
                Step(text="done"),
            ]
        ),
    )
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:metrics_wait]] go",
            model=MODEL,
            tools=[session_pb2.CallerTool(name="lookup")],
            answer_timeout=Duration(seconds=600),
        ),
        metadata=auth("waiter"),
    )
    request = None
    async for event in call:
        if event.HasField("input_request"):
            request = event
            break
    assert request is not None

    rows = [r for r in await _session_rows(h) if r.tenant == "waiter"]
    assert [r.state for r in rows] == ["RUNNING"]
    assert await _pending_inputs(h) == 1
    windows = await _windows_today(h)
    # Its first model request (the tool call) is recorded as it settles.
    requests: list[ModelRequestRow] = []
    for _ in range(600):  # written by the session's recorder, soon after it settled
        requests = [r for r in await _request_rows(h) if r.tenant == "waiter"]
        if requests:
            break
        await asyncio.sleep(0.1)
    spent_so_far = sum((r.cost_usd for r in requests), Decimal(0))
    assert spent_so_far > 0

    def waiting(found: Scrape) -> None:
        assert (
            found.value("agentplane_sessions_live", tenant="waiter", state="awaiting_caller") == 1
        )
        assert found.value("agentplane_sessions_live", tenant="waiter") == 1
        assert found.value("agentplane_capacity_used", holder="session") == 1
        assert _usd(found.value("agentplane_budget_reserved_usd", tenant="waiter")) == (
            windows["waiter"].reserved_usd
        )
        assert windows["waiter"].reserved_usd == Decimal(1)
        assert found.value("agentplane_budget_remaining_usd", tenant="waiter") == 0
        # The cost accrues with each request, before the session ends.
        assert _usd(found.value("agentplane_cost_usd_total", tenant="waiter")) == spent_so_far
        assert found.value("agentplane_session_cost_usd_total", tenant="waiter") == 0

    await eventually(h, waiting)

    # The day is held: another session of the tenant is refused, and counted.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(
            h.sessions.RunSession(
                session_pb2.RunSessionRequest(prompt="another", model=MODEL),
                metadata=auth("waiter"),
            )
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(refused.value)["ErrorInfo"].reason == "BUDGET_EXCEEDED"
    found = await read_scrape(h)
    assert (
        found.value(
            "agentplane_admission_rejections_total", tenant="waiter", reason="BUDGET_EXCEEDED"
        )
        == 1
    )
    assert (
        found.value(
            "grpc_server_call_duration_seconds_count",
            grpc_method="agentplane.v1.SessionService/RunSession",
            grpc_status="RESOURCE_EXHAUSTED",
        )
        == 1
    )

    await h.sessions.Respond(
        session_pb2.RespondRequest(
            session_id=request.session_id,
            request_id=request.input_request.request_id,
            tool_result=session_pb2.ToolCallResult(text="found"),
        ),
        metadata=auth("waiter"),
    )
    events = [event async for event in call]
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE

    def settled(found: Scrape) -> None:
        assert found.value("agentplane_sessions_live", tenant="waiter") == 0
        assert found.value("agentplane_budget_reserved_usd", tenant="waiter") == 0
        assert found.value("agentplane_budget_spent_usd", tenant="waiter") > 0

    await eventually(h, settled)


async def test_after_sessions_the_values_match_the_database(served: Harness) -> None:
    h = served
    h.sandbox.add_script(
        "metrics_throttled",
        Script(
            steps=[
                Step(
                    text="after a 429",
                    failures=[HttpFailure(429, should_retry=True, retry_after=0)],
                )
            ]
        ),
    )
    h.sandbox.add_script(
        "metrics_refused",
        Script(steps=[Step(fail_always=HttpFailure(400, should_retry=False))]),
    )
    throttled = await h.run("acme", prompt="[[sandbox:metrics_throttled]] go")
    assert throttled[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    failed = await h.run("globex", prompt="[[sandbox:metrics_refused]] go")
    assert failed[-1].result.session.state == session_pb2.SESSION_STATE_ERROR
    plain = await h.run("ops", prompt="hello")
    assert plain[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE

    sessions = await _session_rows(h)
    requests = await _request_rows(h)
    assert any(r.status == 429 for r in requests)
    windows = await _windows_today(h)
    tenants = {r.tenant for r in sessions}
    assert {"acme", "globex", "ops", "waiter"} <= tenants

    cost_by_tenant: dict[str, Decimal] = {}
    cost_by_model: dict[tuple[str, str], Decimal] = {}
    for r in requests:
        cost_by_tenant[r.tenant] = cost_by_tenant.get(r.tenant, Decimal(0)) + r.cost_usd
        key = (r.tenant, r.model)
        cost_by_model[key] = cost_by_model.get(key, Decimal(0)) + r.cost_usd
    counted: dict[tuple[str, ...], float] = {}
    for r in requests:
        key = (r.tenant, r.model, str(r.status or ""), r.outcome)
        counted[key] = counted.get(key, 0) + 1
    ended: dict[tuple[str, ...], float] = {}
    for s in sessions:
        key = (s.tenant, s.state, s.error_reason or "")
        ended[key] = ended.get(key, 0) + 1
    completed = [r for r in requests if r.outcome == "completed"]

    def matches(found: Scrape) -> None:
        # Cost as it accrued, per tenant and model: what the database recorded.
        for tenant in tenants:
            session_cost = sum((s.cost_usd for s in sessions if s.tenant == tenant), Decimal(0))
            assert cost_by_tenant.get(tenant, Decimal(0)) == session_cost
            assert _usd(found.value("agentplane_cost_usd_total", tenant=tenant)) == session_cost
            window = windows[tenant]
            assert _usd(found.value("agentplane_budget_spent_usd", tenant=tenant)) == (
                window.spent_usd
            )
            assert _usd(found.value("agentplane_budget_reserved_usd", tenant=tenant)) == (
                window.reserved_usd
            )
        assert {
            k: _usd(v) for k, v in found.by("agentplane_cost_usd_total", "tenant", "model").items()
        } == {k: v for k, v in cost_by_model.items() if v}
        assert (
            found.by("agentplane_model_requests_total", "tenant", "model", "status", "outcome")
            == counted
        )
        # Sessions by how they ended, and none live.
        assert found.by("agentplane_sessions_ended_total", "tenant", "outcome", "reason") == ended
        assert found.by("agentplane_sessions_live", "tenant", "state") == {}
        # The GenAI client metrics: one duration per request, tokens as the conventions
        # count them (input includes the cache).
        assert found.value("gen_ai_client_operation_duration_seconds_count") == len(requests)
        assert found.value(
            "gen_ai_client_operation_duration_seconds_count",
            http_response_status_code="429",
            error_type="upstream_error",
        ) == counted_status(requests, 429)
        inputs = sum(
            r.input_tokens + r.cache_read_input_tokens + r.cache_creation_input_tokens
            for r in requests
        )
        outputs = sum(r.output_tokens for r in requests)
        assert found.value("gen_ai_client_token_usage_sum", gen_ai_token_type="input") == inputs
        assert found.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output") == outputs
        first_chunks = found.value("gen_ai_client_operation_time_to_first_chunk_seconds_count")
        assert 1 <= first_chunks <= len(completed)

    await eventually(h, matches)
    # The RunSession calls, by code.
    found = await read_scrape(h)
    assert (
        found.value(
            "grpc_server_call_duration_seconds_count",
            grpc_method="agentplane.v1.SessionService/RunSession",
            grpc_status="OK",
        )
        == 4
    )
    assert (
        found.value(
            "grpc_server_call_started_total", grpc_method="agentplane.v1.SessionService/RunSession"
        )
        == 5
    )


def counted_status(requests: list[ModelRequestRow], status: int) -> int:
    return sum(1 for r in requests if r.status == status)


# -- the dashboard and the alert rules name only what /metrics lists ---------------------


async def test_the_dashboard_and_the_alerts_read_only_listed_metrics(served: Harness) -> None:
    found = await read_scrape(served)
    listed = set(found.samples)
    queries = dashboard_queries(load_dashboard()) + alert_queries()
    assert len(queries) >= 20
    missing = {
        (where, name)
        for where, expr in queries
        for name in metric_names(expr)
        if name not in listed
    }
    assert not missing, f"queries name metrics /metrics does not list: {sorted(missing)}"
    # Every family the dashboard is about has a panel.
    used = {name for _, expr in queries for name in metric_names(expr)}
    for family, kind in FAMILIES.items():
        names = {f"{family}{s}" for s in SUFFIXES} | {family}
        assert names & used, f"no panel or alert reads {family} ({kind})"


async def test_a_tenant_a_reload_adds_is_listed_at_zero(served: Harness) -> None:
    h = served
    path = h.app.settings.tenants_file
    assert path is not None
    before = path.read_text()
    path.write_text(before + "\n" + tenant_toml("late", "late-token-10", daily_limit_usd=3.0))
    try:
        changes = await h.app.reload_tenants("test")
        assert changes is not None and changes.added == ("late",)

        def listed(found: Scrape) -> None:
            assert ({"tenant": "late"}, 0.0) in found.samples["agentplane_sessions_started_total"]
            assert (
                {"tenant": "late", "reason": "BUDGET_EXCEEDED"},
                0.0,
            ) in found.samples["agentplane_admission_rejections_total"]
            assert found.value("agentplane_sessions_live", tenant="late", state="running") == 0
            assert ({"tenant": "late", "state": "running"}, 0.0) in found.samples[
                "agentplane_sessions_live"
            ]
            assert found.value("agentplane_budget_limit_usd", tenant="late") == 3.0
            assert found.value("agentplane_budget_remaining_usd", tenant="late") == 3.0

        await eventually(h, listed)
    finally:
        path.write_text(before)
        await h.app.reload_tenants("test")


# -- the gauges and readiness, without a server -------------------------------------------


def _gauge_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    found: dict[str, list[tuple[dict[str, Any], float]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    found.setdefault(metric.name, []).append(
                        (dict(point.attributes or {}), point.value)  # type: ignore[union-attr]
                    )
    return found


def _window(tenant: str, limit: str, spent: str, reserved: str) -> BudgetWindow:
    now = utcnow()
    return BudgetWindow(
        tenant, "2030-01-01", "UTC", now, now, Decimal(limit), Decimal(spent), Decimal(reserved)
    )


def test_the_gauges_report_what_holds_the_server_and_every_label_at_zero() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry.create(OtelConfig(), metric_readers=[reader])
    occupancy = Occupancy(
        limit=8,
        admitting=1,
        warm_agents=3,
        sessions=[
            ("a", SessionState.IDLE, False),
            ("a", SessionState.RUNNING, True),
            ("a", SessionState.RUNNING, False),
            ("b", SessionState.RUNNING, False),
        ],
        warm_idle={"b": 2},
    )
    ServerGauges(
        telemetry.instruments("agentplane"),
        Sources(
            tenants=lambda: ["a", "b", "c"],
            occupancy=lambda: occupancy,
            budgets=lambda: {"a": _window("a", "10", "7.5", "1.5")},
            pools={},
            readiness=lambda: {"server": False, "database": True},
        ),
    )
    points = _gauge_points(reader)
    assert sorted(points["agentplane.capacity.limit"]) == [({}, 8)]
    assert {p["holder"]: v for p, v in points["agentplane.capacity.used"]} == {
        "session": 4,
        "admitting": 1,
        "warm_agent": 3,
    }
    live = {(p["tenant"], p["state"]): v for p, v in points["agentplane.sessions.live"]}
    assert live == {
        ("a", "starting"): 1,
        ("a", "running"): 1,
        ("a", "awaiting_caller"): 1,
        ("b", "starting"): 0,
        ("b", "running"): 1,
        ("b", "awaiting_caller"): 0,
        ("c", "starting"): 0,
        ("c", "running"): 0,
        ("c", "awaiting_caller"): 0,
    }
    assert {p["tenant"]: v for p, v in points["agentplane.warm_pool.idle"]} == {
        "a": 0,
        "b": 2,
        "c": 0,
    }
    assert points["agentplane.budget.spent_usd"] == [({"tenant": "a"}, 7.5)]
    assert points["agentplane.budget.reserved_usd"] == [({"tenant": "a"}, 1.5)]
    assert points["agentplane.budget.remaining_usd"] == [({"tenant": "a"}, 1.0)]
    assert {p["dependency"]: v for p, v in points["agentplane.ready"]} == {
        "server": 0,
        "database": 1,
    }
    telemetry.shutdown()


def test_a_gauge_whose_source_fails_is_left_out_and_the_rest_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry.create(OtelConfig(), metric_readers=[reader])

    def broken() -> Occupancy:
        raise RuntimeError("dictionary changed size during iteration")

    ServerGauges(
        telemetry.instruments("agentplane"),
        Sources(
            tenants=lambda: ["a"],
            occupancy=broken,
            budgets=dict,
            pools={},
            readiness=lambda: {"server": True},
        ),
    )
    with caplog.at_level(logging.ERROR, logger="agentplane"):
        points = _gauge_points(reader)
    assert "agentplane.capacity.used" not in points
    assert points["agentplane.ready"] == [({"dependency": "server"}, 1)]
    assert any(r.message == "telemetry_failed" for r in caplog.records)
    telemetry.shutdown()


async def test_readiness_per_dependency(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/h.db")
    health = Health()
    await health.init(sandboxed=False)
    assert health.dependencies()["server"] is False  # starting up
    assert health.dependencies()["database"] is False  # not checked yet
    try:
        await health.check(engine, engine, tmp_path / "no-such-cli", migrate_first=True)
        assert health.dependencies() == {
            "server": False,
            "database": True,
            "agent_cli": False,
            "model_api": True,
            "sandbox": False,
            "tenants_file": True,
        }
        await health.tenants(False)
        assert health.dependencies()["tenants_file"] is False
    finally:
        await health.shutdown()
        await engine.dispose()
