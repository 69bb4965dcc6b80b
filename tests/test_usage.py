"""UsageService.GetUsage: computed from the database, so a restarted server answers the
same; through the stubs, the Python client and the `agentplane usage` CLI."""

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
from agentplane.server.sandbox import Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2, usage_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from harness import TOKENS, Harness, error_details, start_harness, stop_harness

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

    h.sandbox.add_script("used", Script(steps=[
        Step(tool_calls=[ToolCall("Glob", {"pattern": "*.txt"}),
                         ToolCall("Read", {"file_path": "hello.txt"})],
             usage=Usage(input_tokens=1000, output_tokens=50)),
        Step(tool_calls=[ToolCall("Read", {"file_path": "hello.txt"})],
             usage=Usage(input_tokens=1100, output_tokens=40)),
        Step(text="PAPAYA", usage=Usage(input_tokens=1200, output_tokens=10)),
    ]))
    h.sandbox.add_script("short", Script(steps=[
        Step(tool_calls=[ToolCall("Glob", {"pattern": "*"})]), Step(text="never"),
    ]))
    ok, failed, other = await asyncio.gather(
        h.run(prompt="[[sandbox:used]] go"),
        h.run(prompt="[[sandbox:short]] go", max_turns=1),
        h.run("globex", prompt="not acme's"),
    )
    sessions = [ok[-1].result.session, failed[-1].result.session]
    assert [s.state for s in sessions] == [session_pb2.SESSION_STATE_COMPLETE, session_pb2.SESSION_STATE_ERROR]
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
    code = await asyncio.to_thread(main, [
        "--target", f"127.0.0.1:{h.app.port}", "--token", TOKENS["acme"], "usage",
        "--since", before.isoformat(), "--until", after.isoformat(),
    ])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert printed["sessions_total"] == "2" and printed["success_rate"] == 0.5
    assert printed["failures_by_reason"] == {"MAX_TURNS": "1"}
    assert printed["total_cost_usd"] == ranged.total_cost_usd
    assert await asyncio.to_thread(main, [
        "--target", f"127.0.0.1:{h.app.port}", "--token", TOKENS["globex"], "usage",
    ]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tenant"] == "globex" and printed["sessions_failed"] == "0"
    assert printed["tool_uses"] == {} and printed["success_rate"] == 1.0
