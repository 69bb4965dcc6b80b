"""One trace from the caller to every tool call, over real OTLP; metrics in memory and on
Prometheus; JSON logs with trace ids; no prompt and no secret in any of them.

The server's telemetry is its own (injected into App.start): spans go over OTLP/gRPC to a
receiver in this test, metrics to an in-memory reader, a Prometheus endpoint and OTLP.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
from agentplane.server.config import Settings
from agentplane.server.domain import (
    ErrorReason,
    Event,
    EventKind,
    Session,
    SessionState,
    TokenUsage,
    utcnow,
)
from agentplane.server.errors import ConfigError
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.server.telemetry.logs import JsonFormatter, redact
from agentplane.server.telemetry.otel_env import OtelConfig
from agentplane.server.telemetry.setup import ContentPolicy, Telemetry
from agentplane.server.telemetry.tracing import SessionSpans
from agentplane.v1 import session_pb2, usage_pb2
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    MODEL,
    TOKENS,
    Harness,
    error_details,
    processes,
    tenant_toml,
)
from opentelemetry import propagate, trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import attributes
from prometheus_client.parser import text_string_to_metric_families
from traced import Traced, hexid, json_logs, start_traced

TIGHT_TOKEN = "tight-secret-token-5"
# Its whole day fits one session: a second one while the first runs is BUDGET_EXCEEDED.
TIGHT = tenant_toml(
    "tight",
    TIGHT_TOKEN,
    anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
    allowed_tools=["Glob", "Read"],
    daily_limit_usd=1.0,
    max_session_budget_usd=1.0,
    max_turns=4,
)
PROMPT_MARKER = "PROMPT-TEXT-7f3a91-never-in-telemetry"
SECRETS = ["sk-ant-test-acme-key", "sk-ant-test-globex-key", TIGHT_TOKEN, *TOKENS.values()]
SERVER, INTERNAL = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_INTERNAL
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


@pytest.fixture(scope="module")
def logs(database_url: str) -> Iterator[io.StringIO]:
    """One buffer of JSON log lines per database, like the server's stderr."""
    with json_logs() as buffer:
        yield buffer


@pytest.fixture(scope="module")
async def traced(database_url: str, logs: io.StringIO) -> AsyncIterator[Traced]:
    t = await start_traced(database_url, logs, extra_tenants=TIGHT, prometheus=True)
    yield t
    await t.close()


async def read_until(call: Any, done: Callable[[session_pb2.SessionEvent], bool]) -> list[Any]:
    events = []
    while True:
        event = await call.read()
        assert event is not grpc.aio.EOF
        events.append(event)
        if done(event):
            return events


def cli_traceparent(h: Harness) -> str | None:
    for agent in processes(h.work_dir):
        for item in agent.env:
            if item.startswith(b"TRACEPARENT="):
                return item.split(b"=", 1)[1].decode()
    return None


async def test_one_trace_from_the_caller_to_every_tool_call(traced: Traced) -> None:
    h = traced.h
    h.sandbox.add_script(
        "traced",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall("Glob", {"pattern": "*.txt"}),
                        ToolCall("Read", {"file_path": "/nonexistent/missing.txt"}),
                    ],
                    usage=Usage(input_tokens=1000, output_tokens=50),
                ),
                Step(text="done", delay_s=1.0, usage=Usage(input_tokens=1200, output_tokens=20)),
            ]
        ),
    )
    caller = TracerProvider().get_tracer("caller")
    with caller.start_as_current_span("caller work") as caller_span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    caller_ctx = caller_span.get_span_context()
    trace_id = format(caller_ctx.trace_id, "032x")

    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=f"[[sandbox:traced]] {PROMPT_MARKER}", model=MODEL),
        metadata=(
            ("authorization", f"Bearer {TIGHT_TOKEN}"),
            ("traceparent", carrier["traceparent"]),
        ),
    )
    events = await read_until(call, lambda e: e.HasField("tool_result") and e.tool_result.is_error)
    traceparent = cli_traceparent(h)  # the CLI is still running: the last step is delayed
    # The day's whole budget is held by the running session: the next one is refused.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await h.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="one more", model=MODEL),
            metadata=(("authorization", f"Bearer {TIGHT_TOKEN}"),),
        ).read()
    assert error_details(refused.value)["ErrorInfo"].reason == "BUDGET_EXCEEDED"
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE
    uses = {e.tool_use.name: e for e in events if e.HasField("tool_use")}
    results = {e.tool_result.tool_use_id: e for e in events if e.HasField("tool_result")}

    expected = {
        "/agentplane.v1.SessionService/RunSession",
        "invoke_agent tight",
        "execute_tool Glob",
        "execute_tool Read",
    }

    def complete(spans: list[trace_pb2.Span]) -> bool:
        ours = [s.name for s in spans if hexid(s.trace_id) == trace_id]
        return expected <= set(ours) and sum(n.startswith("chat ") for n in ours) >= 2

    everything = [s for s in await traced.spans(complete) if hexid(s.trace_id) == trace_id]
    chats = [s for s in everything if s.name.startswith("chat ")]
    spans = [s for s in everything if not s.name.startswith("chat ")]
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == sorted(
        [
            "/agentplane.v1.SessionService/RunSession",
            "invoke_agent tight",
            "execute_tool Glob",
            "execute_tool Read",
        ]
    ), [s.name for s in spans]
    assert len(spans) == 4  # one trace: nothing else in it, nothing twice

    server = by_name["/agentplane.v1.SessionService/RunSession"]
    assert server.kind == SERVER
    assert hexid(server.parent_span_id) == format(caller_ctx.span_id, "016x")

    agent = by_name["invoke_agent tight"]
    assert agent.kind == INTERNAL and agent.parent_span_id == server.span_id
    attrs = attributes(agent.attributes)
    assert attrs["gen_ai.operation.name"] == "invoke_agent"
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.conversation.id"] == final.sdk_session_id
    assert attrs["session.id"] == final.id
    assert attrs["agentplane.tenant"] == "tight"
    assert attrs["gen_ai.usage.input_tokens"] == final.usage.input_tokens == 2200
    assert attrs["gen_ai.usage.output_tokens"] == final.usage.output_tokens == 70
    assert (
        attrs["agentplane.cost_usd"] == pytest.approx(float(final.cost_usd))
        and attrs["agentplane.cost_usd"] > 0
    )
    assert attrs["agentplane.num_turns"] == final.num_turns
    assert attrs["agentplane.session.state"] == "COMPLETE"
    assert "error.type" not in attrs and agent.status.code != ERROR

    for name, is_error in (("Glob", False), ("Read", True)):
        span = by_name[f"execute_tool {name}"]
        use = uses[name]
        result = results[use.tool_use.tool_use_id]
        assert span.kind == INTERNAL and span.parent_span_id == agent.span_id
        tool_attrs = attributes(span.attributes)
        assert tool_attrs["gen_ai.tool.name"] == name
        assert tool_attrs["gen_ai.tool.call.id"] == use.tool_use.tool_use_id
        assert tool_attrs["gen_ai.operation.name"] == "execute_tool"
        assert span.start_time_unix_nano == use.time.ToNanoseconds()
        assert span.end_time_unix_nano == result.time.ToNanoseconds()
        assert result.tool_result.is_error is is_error
        assert (span.status.code == ERROR) is is_error
        assert (tool_attrs.get("error.type") == "tool_error") is is_error
    assert agent.start_time_unix_nano <= by_name["execute_tool Glob"].start_time_unix_nano
    assert agent.end_time_unix_nano >= by_name["execute_tool Read"].end_time_unix_nano

    # One `chat {model}` span per metered model request, under invoke_agent.
    assert len(chats) == 2  # the turn that calls Glob and Read, and the answer
    for chat in chats:
        chat_attrs = attributes(chat.attributes)
        assert chat.name == f"chat {MODEL}" and chat.kind == CLIENT
        assert chat.parent_span_id == agent.span_id
        assert chat_attrs["gen_ai.operation.name"] == "chat"
        assert chat_attrs["gen_ai.request.max_tokens"] > 0
    assert sum(attributes(c.attributes)["gen_ai.usage.input_tokens"] for c in chats) == 2200
    assert sum(
        Decimal(str(attributes(c.attributes)["agentplane.cost_usd"])) for c in chats
    ) == Decimal(final.cost_usd)

    # The CLI was started with the invoke_agent span as its parent context.
    assert traceparent is not None
    version, parent_trace, parent_span, flags = traceparent.split("-")
    assert (version, parent_trace, parent_span) == ("00", trace_id, hexid(agent.span_id))
    assert int(flags, 16) & 1  # sampled
    resource = next(res for res, span in traced.receiver.spans() if span.span_id == agent.span_id)
    assert resource["service.name"] == "agentplane"


async def test_a_failed_session_sets_error_type(traced: Traced) -> None:
    h = traced.h
    h.sandbox.add_script(
        "turny",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("Glob", {"pattern": "*"})]),
                Step(text="never"),
            ]
        ),
    )
    events = await h.run(prompt=f"[[sandbox:turny]] {PROMPT_MARKER}", max_turns=1)
    final = events[-1].result.session
    assert final.error.reason == session_pb2.ERROR_REASON_MAX_TURNS

    def has_agent(spans: list[trace_pb2.Span]) -> bool:
        return any(
            attributes(s.attributes).get("session.id") == final.id
            and s.name.startswith("invoke_agent")
            for s in spans
        )

    agent = next(
        s
        for s in await traced.spans(has_agent)
        if s.name == "invoke_agent acme" and attributes(s.attributes)["session.id"] == final.id
    )
    attrs = attributes(agent.attributes)
    assert attrs["error.type"] == "MAX_TURNS"
    assert attrs["agentplane.session.state"] == "ERROR"
    assert agent.status.code == ERROR


async def test_a_session_that_outlives_its_stream_still_gets_complete_spans(traced: Traced) -> None:
    h = traced.h
    h.sandbox.add_script("outlive", Script(steps=[Step(text="later", delay_s=1.0)]))
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:outlive]] go",
            model=MODEL,
            on_disconnect=session_pb2.ON_DISCONNECT_CONTINUE,
        ),
        metadata=h.auth("globex"),
    )
    session_id = (await call.read()).session_id
    call.cancel()
    rest = [
        e
        async for e in h.sessions.StreamSession(
            session_pb2.StreamSessionRequest(session_id=session_id), metadata=h.auth("globex")
        )
    ]
    assert rest[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE

    def is_agent(span: trace_pb2.Span) -> bool:
        return (
            span.name.startswith("invoke_agent")
            and attributes(span.attributes).get("session.id") == session_id
        )

    spans = await traced.spans(lambda spans: any(is_agent(s) for s in spans))
    agent = next(s for s in spans if is_agent(s))
    server = next(s for s in spans if s.span_id == agent.parent_span_id)
    assert server.name == "/agentplane.v1.SessionService/RunSession"
    assert server.end_time_unix_nano < agent.end_time_unix_nano  # the stream went first
    assert attributes(agent.attributes)["agentplane.session.state"] == "COMPLETE"
    assert attributes(agent.attributes)["gen_ai.usage.output_tokens"] > 0


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """metric name -> [(attributes, data point)]."""
    found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    found.setdefault(metric.name, []).append((dict(point.attributes), point))
    return found


def _value(points: dict[str, list[tuple[dict[str, Any], Any]]], name: str, **labels: str) -> float:
    return sum(p.value for attrs, p in points.get(name, []) if labels.items() <= attrs.items())


async def test_metrics_in_memory_and_on_prometheus(traced: Traced) -> None:
    h = traced.h
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await h.run(prompt="too many turns", max_turns=99)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    points = _points(traced.memory)
    assert _value(points, "agentplane.sessions.started", tenant="tight") == 1
    assert _value(points, "agentplane.sessions.started", tenant="acme") == 1
    assert _value(points, "agentplane.sessions.ended", tenant="tight", outcome="COMPLETE") == 1
    assert (
        _value(
            points, "agentplane.sessions.ended", tenant="acme", outcome="ERROR", reason="MAX_TURNS"
        )
        == 1
    )
    assert _value(points, "agentplane.sessions.active") == 0
    assert _value(points, "agentplane.tool_uses", tenant="tight", tool="Glob", outcome="ok") == 1
    assert _value(points, "agentplane.tool_uses", tenant="tight", tool="Read", outcome="error") == 1
    assert (
        _value(points, "agentplane.admission.rejections", tenant="tight", reason="BUDGET_EXCEEDED")
        == 1
    )
    assert (
        _value(points, "agentplane.admission.rejections", tenant="acme", reason="INVALID_ARGUMENT")
        == 1
    )
    assert _value(points, "agentplane.session.tokens", tenant="tight", type="input") == 2200
    assert _value(points, "agentplane.session.tokens", tenant="tight", type="output") == 70
    assert _value(points, "agentplane.session.cost_usd", tenant="tight") > 0
    assert _value(points, "agentplane.session.turns", tenant="tight") >= 2
    durations = [
        p for attrs, p in points["agentplane.session.duration"] if attrs["tenant"] == "tight"
    ]
    assert durations[0].count == 1 and durations[0].sum >= 1.0  # the delayed step

    assert traced.telemetry.prometheus is not None
    url = f"http://127.0.0.1:{traced.telemetry.prometheus.port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    samples = {
        (
            s.name,
            tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_"))),
        ): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("agentplane_sessions_started_total", (("tenant", "tight"),))] == 1
    assert (
        samples[
            (
                "agentplane_sessions_ended_total",
                (("outcome", "ERROR"), ("reason", "MAX_TURNS"), ("tenant", "acme")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "agentplane_tool_uses_total",
                (("outcome", "error"), ("tenant", "tight"), ("tool", "Read")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "agentplane_admission_rejections_total",
                (("reason", "BUDGET_EXCEEDED"), ("tenant", "tight")),
            )
        ]
        == 1
    )
    assert samples[("agentplane_sessions_active", (("tenant", "tight"),))] == 0
    assert samples[("agentplane_session_cost_usd_total", (("tenant", "tight"),))] > 0
    assert (
        samples[
            (
                "agentplane_session_duration_seconds_count",
                (("outcome", "COMPLETE"), ("tenant", "tight")),
            )
        ]
        == 1
    )


async def test_waiting_for_the_caller_is_on_the_span_and_counted(traced: Traced) -> None:
    h = traced.h
    h.sandbox.add_script(
        "traced_loop",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("mcp__caller__lookup", {"q": "x"})]),
                Step(tool_calls=[ToolCall("Bash", {"command": "echo unapproved"})]),
                Step(text="done"),
            ]
        ),
    )
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:traced_loop]] go",
            model=MODEL,
            require_approval=["Bash"],
            tools=[session_pb2.CallerTool(name="lookup")],
            answer_timeout=Duration(seconds=1),
        ),
        metadata=h.auth("loop"),
    )
    async for event in call:
        if event.HasField("input_request") and event.input_request.tool_name == "lookup":
            await h.sessions.Respond(
                session_pb2.RespondRequest(
                    session_id=event.session_id,
                    request_id=event.input_request.request_id,
                    tool_result=session_pb2.ToolCallResult(text="found"),
                ),
                metadata=h.auth("loop"),
            )
        last = event
    session_id = last.result.session.id  # the Bash approval timed out: denied

    def ended(spans: list[trace_pb2.Span]) -> bool:
        return any(s.name == "invoke_agent loop" for s in spans)

    spans = await traced.spans(ended)
    agent = next(
        s
        for s in spans
        if s.name == "invoke_agent loop" and attributes(s.attributes)["session.id"] == session_id
    )
    waits = [attributes(e.attributes) for e in agent.events if e.name == "agentplane.caller_input"]
    assert [
        (
            w["agentplane.input.kind"],
            w["agentplane.input.decided_by"],
            w["agentplane.input.outcome"],
        )
        for w in waits
    ] == [("TOOL_CALL", "CALLER", "result"), ("PERMISSION", "TIMEOUT", "deny")]
    assert waits[1]["agentplane.input.waited_ms"] >= 1000
    # The Respond call is a trace of its own that names the session and links to its trace.
    (respond,) = [s for s in spans if s.name == "/agentplane.v1.SessionService/Respond"]
    assert attributes(respond.attributes)["session.id"] == session_id
    assert [(link.trace_id, link.span_id) for link in respond.links] == [
        (agent.trace_id, agent.parent_span_id)  # the RunSession span that admitted it
    ]
    bash = next(s for s in spans if s.name == "execute_tool Bash" and s.trace_id == agent.trace_id)
    assert attributes(bash.attributes)["agentplane.input.decided_by"] == "TIMEOUT"
    points = _points(traced.memory)
    assert (
        _value(
            points, "agentplane.caller.inputs", tenant="loop", kind="TOOL_CALL", decided_by="CALLER"
        )
        == 1
    )
    assert (
        _value(
            points,
            "agentplane.caller.inputs",
            tenant="loop",
            kind="PERMISSION",
            decided_by="TIMEOUT",
            outcome="deny",
        )
        == 1
    )


async def test_stop_flushes_spans_and_metrics_and_health_checks_are_not_traced(
    traced: Traced,
) -> None:
    h = traced.h
    health = health_pb2_grpc.HealthStub(h.channel)
    await health.Check(health_pb2.HealthCheckRequest(service=""))
    usage = await h.usage.GetUsage(usage_pb2.GetUsageRequest(), metadata=h.auth("acme"))
    assert usage.sessions_total == 1
    exported = len(traced.receiver.spans())
    await traced.stop()  # no flush of ours: the App's stop must export what is pending
    spans = [span for _, span in traced.receiver.spans()]
    assert len(spans) > exported
    assert "/agentplane.v1.UsageService/GetUsage" in [s.name for s in spans]
    assert not [s.name for s in spans if "Health" in s.name]
    assert {
        "agentplane.sessions.started",
        "agentplane.sessions.ended",
        "agentplane.tool_uses",
    } <= traced.receiver.metric_names()
    assert any(
        line["event"] == "shutdown" and line.get("phase") == "done" for line in traced.log_lines()
    )


async def test_logs_are_json_with_trace_ids_and_nothing_secret(traced: Traced) -> None:
    lines = traced.log_lines()  # every line parses as JSON
    spans = traced.receiver.spans()
    span_trace = {hexid(s.span_id): hexid(s.trace_id) for _, s in spans}
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)

    start = next(x for x in by_event["session_start"] if x["tenant"] == "tight")
    agent = next(s for _, s in spans if s.name == "invoke_agent tight")
    assert start["session_id"] == attributes(agent.attributes)["session.id"]
    assert (start["trace_id"], start["span_id"]) == (hexid(agent.trace_id), hexid(agent.span_id))
    tool_lines = [x for x in by_event["tool_use"] if x["session_id"] == start["session_id"]]
    assert sorted(x["tool"] for x in tool_lines) == ["Glob", "Read"]
    for x in tool_lines:  # each names its own execute_tool span
        assert span_trace[x["span_id"]] == x["trace_id"] == start["trace_id"]
    complete = next(
        x for x in by_event["session_complete"] if x["session_id"] == start["session_id"]
    )
    assert complete["trace_id"] == start["trace_id"] and complete["tenant"] == "tight"
    error = by_event["session_error"][0]
    assert error["reason"] == "MAX_TURNS" and error["trace_id"] in span_trace.values()
    rejected = by_event["budget_rejected"][0]
    assert rejected["tenant"] == "tight" and rejected["reason"] == "BUDGET_EXCEEDED"
    assert len(rejected["trace_id"]) == 32 and rejected["span_id"] in span_trace
    refused = next(s for _, s in spans if hexid(s.span_id) == rejected["span_id"])
    assert refused.name == "/agentplane.v1.SessionService/RunSession"
    assert (
        attributes(refused.attributes)["rpc.grpc.status_code"]
        == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    )
    assert "shutdown" in by_event

    dump = traced.logs.getvalue() + "\n".join(
        json.dumps(
            [
                resource,
                attributes(s.attributes),
                [attributes(e.attributes) for e in s.events],
                s.status.message,
                s.name,
            ]
        )
        for resource, s in spans
    )
    assert "tight" in dump and "session_start" in dump  # the scan sees real data
    assert PROMPT_MARKER not in dump and "missing.txt" not in dump
    for secret in SECRETS:
        assert secret not in dump


# -- without a server ---------------------------------------------------------------------


def test_otel_settings_from_the_environment() -> None:
    http = OtelConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "ap-prod",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:4318/v1/metrics",
        }
    )
    assert http.traces_endpoint == "http://collector:4318/v1/traces"
    assert http.metrics_endpoint == "http://metrics:4318/v1/metrics"
    assert http.service_name == "ap-prod" and not http.disabled
    default = OtelConfig.from_env({})
    assert default.service_name == "agentplane" and default.traces_endpoint is None
    assert OtelConfig.from_env({"OTEL_TRACES_EXPORTER": "none"}).traces_exporters == ()
    with pytest.raises(ConfigError) as bad:
        OtelConfig.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert bad.value.setting == "OTEL_EXPORTER_OTLP_PROTOCOL"

    settings = Settings.from_env(
        {
            "AGENTPLANE_LISTEN": "0.0.0.0:50051",
            "AGENTPLANE_PROMETHEUS_PORT": "9464",
            "AGENTPLANE_TRACE_CONTENT": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
        }
    )
    assert settings.prometheus_address == ("0.0.0.0", 9464)
    assert settings.trace_content and settings.trace_content_max_chars == 4096
    assert settings.otel.traces_endpoint == settings.otel.metrics_endpoint == "http://c:4317"
    assert Settings.from_env({}).prometheus_address is None
    for name, value in [
        ("AGENTPLANE_PROMETHEUS_PORT", "http"),
        ("AGENTPLANE_TRACE_CONTENT", "yes"),
        ("AGENTPLANE_TRACE_CONTENT_MAX_CHARS", "0"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
    ]:
        with pytest.raises(ConfigError) as bad:
            Settings.from_env({name: value})
        assert bad.value.setting == name

    off = Telemetry.create(OtelConfig.from_env({"OTEL_SDK_DISABLED": "true"}))
    assert not off.tracing and off.server_interceptors() == []
    assert not off.tracer_provider.get_tracer("x").start_span("s").get_span_context().is_valid
    off.shutdown()


def test_without_an_exporter_spans_are_not_recorded_but_trace_ids_still_flow() -> None:
    quiet = Telemetry.create(OtelConfig.from_env({}))  # no OTLP endpoint: nowhere to send
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = propagate.extract({"traceparent": caller})
    span = quiet.tracer_provider.get_tracer("x").start_span("s", context=context)
    assert not span.is_recording()
    assert format(span.get_span_context().trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert quiet.server_interceptors() != []  # the caller's trace still reaches logs and the CLI
    quiet.shutdown()


def _session(**changes: Any) -> Session:
    now = utcnow()
    base = Session(
        id="s-1",
        tenant="acme",
        state=SessionState.IDLE,
        create_time=now,
        max_budget_usd=Decimal(1),
        max_turns=4,
        allowed_tools=("Read",),
        model=MODEL,
    )
    return base.evolve(**changes)


def _record(content: ContentPolicy) -> list[Any]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    session = _session()
    spans = SessionSpans(provider.get_tracer("t"), session, "the secret prompt " * 20, content)
    start = session.create_time + timedelta(milliseconds=5)
    spans.tool_started(
        Event(
            "s-1",
            3,
            start,
            EventKind.TOOL_USE,
            {"tool_use_id": "t1", "name": "Read", "input_json": '{"file_path": "/x"}'},
        )
    )
    spans.tool_started(
        Event(
            "s-1",
            4,
            start,
            EventKind.TOOL_USE,
            {"tool_use_id": "t2", "name": "Bash", "input_json": "{}"},
        )
    )
    spans.tool_finished(
        Event(
            "s-1",
            5,
            start + timedelta(milliseconds=7),
            EventKind.TOOL_RESULT,
            {"tool_use_id": "t1", "is_error": False, "content": "file body " * 100},
        )
    )
    interrupted = spans.end(
        session.evolve(
            state=SessionState.ERROR,
            end_time=start + timedelta(seconds=1),
            error_reason=ErrorReason.CANCELLED,
            error_message="cancelled",
            usage=TokenUsage(10, 2),
        )
    )
    assert interrupted == ["Bash"]
    provider.shutdown()
    return list(exporter.get_finished_spans())


def test_prompts_and_tool_io_are_recorded_only_when_asked_and_capped() -> None:
    default = {s.name: dict(s.attributes or {}) for s in _record(ContentPolicy())}
    assert not [
        k
        for attrs in default.values()
        for k in attrs
        if k in ("gen_ai.input.messages", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result")
    ]
    assert "secret prompt" not in json.dumps(default)

    spans = {s.name: s for s in _record(ContentPolicy(capture=True, max_chars=50))}
    agent = dict(spans["invoke_agent acme"].attributes or {})
    messages = json.loads(agent["gen_ai.input.messages"])
    assert messages[0]["role"] == "user"
    assert messages[0]["parts"][0]["content"] == ("the secret prompt " * 20)[:50] + "…"
    assert agent["error.type"] == "CANCELLED"
    read = dict(spans["execute_tool Read"].attributes or {})
    assert read["gen_ai.tool.call.arguments"] == '{"file_path": "/x"}'
    assert len(read["gen_ai.tool.call.result"]) == 51
    bash = spans["execute_tool Bash"]  # still running when the session ended
    assert bash.status.status_code is trace.StatusCode.ERROR
    assert bash.end_time == spans["invoke_agent acme"].end_time


def test_log_lines_mask_keys_and_bearer_tokens() -> None:
    assert (
        redact("key sk-ant-api03-abcdefghijk and Bearer tok123")
        == "key sk-ant-api0*** and Bearer ***"
    )
    record = logging.LogRecord("agentplane.x", logging.INFO, __file__, 1, "retry", None, None)
    record.session_id = "s-1"
    record.detail = "failed with sk-ant-test-acme-key"
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "retry" and line["session_id"] == "s-1"
    assert "sk-ant-test-acme-key" not in json.dumps(line) and "trace_id" not in line
