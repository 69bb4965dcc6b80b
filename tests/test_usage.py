"""UsageService.GetUsage: computed from the database, so a restarted server answers the
same; through the stubs, the Python client and the `agentplane usage` CLI. Its per-model
breakdown sums the metered model requests (model_requests) by when they ended."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from agentplane import Client
from agentplane.cli import main
from agentplane.server.app import App
from agentplane.server.model_double import HttpFailure, Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2, usage_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from harness import MODEL, TOKENS, Harness, error_details, start_harness, stop_harness

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[list[Harness]]:
    """The harness in a list: a test may restart its App on the same database."""
    holder = [await start_harness(database_url)]
    yield holder
    await stop_harness(holder[0])


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


async def usage(h: Harness, tenant: str = "acme", **fields: Timestamp) -> usage_pb2.Usage:
    return await h.usage.GetUsage(usage_pb2.GetUsageRequest(**fields), metadata=h.auth(tenant))


async def restart(h: Harness) -> Harness:
    """Stop the App and start a new one on the same database (a new port, a new channel)."""
    await h.channel.close()
    await h.app.stop(grace=1)
    app = await App.start(h.app.settings, h.app.tenants)
    await app.ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return Harness(app, h.sandbox, channel, h.database_url, h.work_dir, h.workspace)


async def test_usage_is_computed_from_the_database_and_survives_a_restart(
    server: list[Harness], capsys: pytest.CaptureFixture[str]
) -> None:
    h = server[0]
    before = datetime.now(UTC) - timedelta(seconds=1)
    empty = await usage(h)
    assert empty.sessions_total == 0 and empty.success_rate == 0
    assert empty.total_cost_usd == "0.000000" and empty.average_cost_usd == "0.000000"

    h.sandbox.add_script(
        "used",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall("Glob", {"pattern": "*.txt"}),
                        ToolCall("Read", {"file_path": "hello.txt"}),
                    ],
                    usage=Usage(input_tokens=1000, output_tokens=50),
                ),
                Step(
                    tool_calls=[ToolCall("Read", {"file_path": "hello.txt"})],
                    usage=Usage(input_tokens=1100, output_tokens=40),
                ),
                Step(text="PAPAYA", usage=Usage(input_tokens=1200, output_tokens=10)),
            ]
        ),
    )
    h.sandbox.add_script(
        "short",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("Glob", {"pattern": "*"})]),
                Step(text="never"),
            ]
        ),
    )
    ok, failed, other = await asyncio.gather(
        h.run(prompt="[[sandbox:used]] go"),
        h.run(prompt="[[sandbox:short]] go", max_turns=1),
        h.run("globex", prompt="not acme's"),
    )
    sessions = [ok[-1].result.session, failed[-1].result.session]
    assert [s.state for s in sessions] == [
        session_pb2.SESSION_STATE_COMPLETE,
        session_pb2.SESSION_STATE_ERROR,
    ]
    assert sessions[1].error.reason == session_pb2.ERROR_REASON_MAX_TURNS
    assert other[-1].result.session.tenant == "globex"
    after = datetime.now(UTC) + timedelta(seconds=1)

    got = await usage(h)
    assert got.tenant == "acme"
    assert (got.sessions_total, got.sessions_succeeded, got.sessions_failed) == (2, 1, 1)
    assert dict(got.failures_by_reason) == {"MAX_TURNS": 1}
    assert got.success_rate == 0.5
    total = sum(Decimal(s.cost_usd) for s in sessions)
    assert total > 0 and Decimal(got.total_cost_usd) == total
    assert Decimal(got.average_cost_usd) == (total / 2).quantize(Decimal("0.000001"))
    assert got.total_turns == sum(s.num_turns for s in sessions)
    tools = [e.tool_use.name for events in (ok, failed) for e in events if e.HasField("tool_use")]
    assert dict(got.tool_uses) == {name: tools.count(name) for name in set(tools)}
    assert dict(got.tool_uses)["Read"] == 2
    assert got.HasField("end_time") and not got.HasField("start_time")
    # Every request of these sessions ended in the (unbounded) range: the breakdown by model
    # adds up to the sessions' cost.
    assert [m.model for m in got.models] == [MODEL]
    assert Decimal(got.models[0].cost_usd) == total

    # Scoped to the caller's tenant and to [start_time, end_time).
    globex = await usage(h, "globex")
    assert (globex.tenant, globex.sessions_total, globex.sessions_succeeded) == ("globex", 1, 1)
    assert dict(globex.tool_uses) == {}
    assert (await usage(h, start_time=ts(after))).sessions_total == 0
    assert (await usage(h, end_time=ts(before))).sessions_total == 0
    window = {"start_time": ts(before), "end_time": ts(after)}
    ranged = await usage(h, **window)
    assert ranged.sessions_total == 2 and ranged.start_time == window["start_time"]
    with pytest.raises(grpc.aio.AioRpcError) as inverted:
        await usage(h, start_time=ts(after), end_time=ts(before))
    assert inverted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(inverted.value)["BadRequest"].field_violations[0].field == "end_time"

    h = server[0] = await restart(h)
    assert await usage(h, **window) == ranged

    # The Python client and the CLI read the same numbers.
    def by_client() -> usage_pb2.Usage:
        with Client(f"127.0.0.1:{h.app.port}", token=TOKENS["acme"]) as client:
            return client.get_usage(start_time=before, end_time=after)

    assert await asyncio.to_thread(by_client) == ranged
    code = await asyncio.to_thread(
        main,
        [
            "--target",
            f"127.0.0.1:{h.app.port}",
            "--token",
            TOKENS["acme"],
            "usage",
            "--since",
            before.isoformat(),
            "--until",
            after.isoformat(),
        ],
    )
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert printed["sessions_total"] == "2" and printed["success_rate"] == 0.5
    assert printed["failures_by_reason"] == {"MAX_TURNS": "1"}
    assert printed["total_cost_usd"] == ranged.total_cost_usd
    assert (
        await asyncio.to_thread(
            main,
            [
                "--target",
                f"127.0.0.1:{h.app.port}",
                "--token",
                TOKENS["globex"],
                "usage",
            ],
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["tenant"] == "globex" and printed["sessions_failed"] == "0"
    assert printed["tool_uses"] == {} and printed["success_rate"] == 1.0


HAIKU, OPUS = "claude-haiku-4-5", "claude-opus-4-6"
TOKEN_KINDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
Run = tuple[str, session_pb2.Session]  # a script's name, the final session that ran it


def expected_by_model(h: Harness, runs: list[Run]) -> list[usage_pb2.ModelUsage]:
    """What GetUsage must report by model for `runs`: the sessions' own tokens and cost,
    and the requests the sandbox model answered for each script, by HTTP status (200:
    completed; an error status: upstream_error); sorted by model."""
    found: dict[str, usage_pb2.ModelUsage] = {}
    costs: dict[str, Decimal] = {}
    for script, session in runs:
        model = found.setdefault(session.model, usage_pb2.ModelUsage(model=session.model))
        requests = h.sandbox.find(script=script)
        assert requests and all(r.body and r.body["model"] == session.model for r in requests)
        for r in requests:
            assert r.status is not None
            model.requests_by_outcome["completed" if r.status == 200 else "upstream_error"] += 1
        model.requests_total += len(requests)
        for kind in TOKEN_KINDS:
            setattr(model.usage, kind, getattr(model.usage, kind) + getattr(session.usage, kind))
        costs[session.model] = costs.get(session.model, Decimal("0.000000")) + Decimal(
            session.cost_usd
        )
    for name, cost in costs.items():
        found[name].cost_usd = str(cost)
    return [found[name] for name in sorted(found)]


async def run_all(h: Harness, *runs: tuple[str, str, str]) -> list[Run]:
    """Run the sessions (tenant, model, script name) at once."""
    results = await asyncio.gather(
        *(
            h.run(tenant, model=model, prompt=f"[[sandbox:{script}]] go")
            for tenant, model, script in runs
        )
    )
    return [
        (script, events[-1].result.session)
        for (_, _, script), events in zip(runs, results, strict=True)
    ]


async def models(
    h: Harness, tenant: str = "acme", **fields: Timestamp
) -> list[usage_pb2.ModelUsage]:
    return list((await usage(h, tenant, **fields)).models)


async def test_usage_by_model_sums_the_tenants_metered_requests_that_ended_in_the_range(
    server: list[Harness], capsys: pytest.CaptureFixture[str]
) -> None:
    h = server[0]
    for name, step_usage in {
        "bm-early": Usage(400, 40),
        "bm-late": Usage(900, 90, cache_read_input_tokens=300),
        "bm-haiku": Usage(700, 30, cache_creation_input_tokens=100),
        "bm-gx-sonnet": Usage(5000, 500),
        "bm-gx-opus": Usage(6000, 600, cache_read_input_tokens=60),
    }.items():
        h.sandbox.add_script(name, Script(steps=[Step(text="PAPAYA", usage=step_usage)]))
    h.sandbox.add_script(
        "bm-tools",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Read", {"file_path": "hello.txt"})],
                    usage=Usage(1000, 50, cache_creation_input_tokens=300),
                ),
                Step(text="PAPAYA", usage=Usage(200, 20, cache_read_input_tokens=1300)),
            ]
        ),
    )
    h.sandbox.add_script(
        "bm-fail",
        Script(
            steps=[
                Step(fail_always=HttpFailure(500, should_retry=False)),
            ]
        ),
    )

    t0 = datetime.now(UTC)
    early = await run_all(h, ("acme", MODEL, "bm-early"))
    t1 = datetime.now(UTC)
    inside = await run_all(
        h,
        ("acme", MODEL, "bm-tools"),
        ("acme", HAIKU, "bm-haiku"),
        ("acme", HAIKU, "bm-fail"),
        ("globex", MODEL, "bm-gx-sonnet"),
        ("globex", OPUS, "bm-gx-opus"),
    )
    t2 = datetime.now(UTC)
    late = await run_all(h, ("acme", MODEL, "bm-late"))
    for script, session in early + inside + late:
        assert session.state == (
            session_pb2.SESSION_STATE_ERROR
            if script == "bm-fail"
            else session_pb2.SESSION_STATE_COMPLETE
        )
    acme_inside = [run for run in inside if run[1].tenant == "acme"]
    globex_inside = [run for run in inside if run[1].tenant == "globex"]

    got = await usage(h, start_time=ts(t1), end_time=ts(t2))
    want = expected_by_model(h, acme_inside)
    assert list(got.models) == want
    # Not vacuous: two models, tokens of every kind, a failed request, a real cost.
    assert [m.model for m in want] == [HAIKU, MODEL]
    assert dict(want[0].requests_by_outcome).keys() == {"completed", "upstream_error"}
    assert want[1].requests_total == 2 and want[1].usage.cache_creation_input_tokens == 300
    assert want[1].usage.cache_read_input_tokens == 1300 and Decimal(want[1].cost_usd) > 0
    assert sum(Decimal(m.cost_usd) for m in got.models) == Decimal(got.total_cost_usd)

    # Only the caller's tenant: globex's requests of MODEL count for globex alone.
    assert await models(h, "globex", start_time=ts(t1), end_time=ts(t2)) == expected_by_model(
        h, globex_inside
    )
    assert [m.model for m in await models(h, "globex", start_time=ts(t1))] == [OPUS, MODEL]

    # Requests that ended before start_time, or at or after end_time, are left out.
    assert await models(h, start_time=ts(t0), end_time=ts(t1)) == expected_by_model(h, early)
    assert await models(h, start_time=ts(t2)) == expected_by_model(h, late)
    assert await models(h, start_time=ts(t0)) == expected_by_model(h, early + acme_inside + late)
    assert await models(h, start_time=ts(datetime.now(UTC))) == []

    # The CLI prints the same breakdown.
    assert (
        await asyncio.to_thread(
            main,
            [
                "--target",
                f"127.0.0.1:{h.app.port}",
                "--token",
                TOKENS["acme"],
                "usage",
                "--since",
                t1.isoformat(),
                "--until",
                t2.isoformat(),
            ],
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"] == [
        MessageToDict(
            m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for m in want
    ]
    assert printed["models"][1]["model"] == MODEL
    assert printed["models"][1]["requests_total"] == "2"


async def test_usage_by_model_counts_a_request_by_when_it_ended_not_by_its_session(
    server: list[Harness],
) -> None:
    """A session created before a range's start has its later requests in the range
    (while the session fields, by creation time, leave it out)."""
    h = server[0]
    h.sandbox.add_script(
        "bm-span",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Read", {"file_path": "hello.txt"})], usage=Usage(800, 80)
                ),
                Step(text="PAPAYA", usage=Usage(300, 30, cache_read_input_tokens=900), delay_s=1.5),
            ]
        ),
    )
    t0 = datetime.now(UTC)
    running = asyncio.create_task(run_all(h, ("acme", MODEL, "bm-span")))
    async with asyncio.timeout(30):
        while not any(r.step == 1 for r in h.sandbox.find(script="bm-span")):
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the first request has settled; the second is held 1.5 s
    middle = datetime.now(UTC)
    [(_, session)] = await running

    before, after = (
        await usage(h, start_time=ts(t0), end_time=ts(middle)),
        await usage(h, start_time=ts(middle)),
    )
    assert (before.sessions_total, after.sessions_total) == (1, 0)
    [first], [second] = before.models, after.models
    assert (first.model, second.model) == (MODEL, MODEL)
    assert dict(first.requests_by_outcome) == dict(second.requests_by_outcome) == {"completed": 1}
    assert (first.usage.input_tokens, second.usage.input_tokens) == (800, 300)
    assert second.usage.cache_read_input_tokens == 900
    assert Decimal(first.cost_usd) + Decimal(second.cost_usd) == Decimal(session.cost_usd)
    for kind in TOKEN_KINDS:
        assert getattr(first.usage, kind) + getattr(second.usage, kind) == getattr(
            session.usage, kind
        )
