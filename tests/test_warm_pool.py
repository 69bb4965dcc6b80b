"""The warm pool: agents started ahead of demand, served once, never shared, never left."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplane.server.errors import ConfigError
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.server.sandbox.owners import write_marker
from agentplane.server.sessions.agents.pool import WARM_MARKER
from agentplane.v1 import session_pb2
from google.protobuf import json_format
from harness import (
    Harness,
    TomlValue,
    agent_processes,
    error_details,
    processes,
    start_harness,
    stop_harness,
    tenant_toml,
    write_tenants,
)

pytestmark = pytest.mark.asyncio

TOKENS = {"warm": "warm-token-7", "cold": "cold-token-8"}


def twin_tenants(pool_size: int, **extra: TomlValue) -> str:
    """Two tenants alike in everything but the name and `warm`'s pool."""
    return "\n".join(
        tenant_toml(
            name,
            TOKENS[name],
            anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
            allowed_tools=["Read", "Glob"],
            system_prompt="You are a careful assistant.",
            max_session_budget_usd=0.5,
            max_turns=6,
            max_concurrent_sessions=8,
            warm_pool_size=size,
            warm_pool_model="claude-sonnet-4-5",
            **extra,
        )
        for name, size in (("warm", pool_size), ("cold", 0))
    )


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


async def run(h: Harness, tenant: str, **fields: Any) -> list[session_pb2.SessionEvent]:
    fields.setdefault("model", "claude-sonnet-4-5")
    call = h.sessions.RunSession(session_pb2.RunSessionRequest(**fields), metadata=auth(tenant))
    return [event async for event in call]


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def warm_markers(h: Harness) -> list[Path]:
    return sorted((h.work_dir / "w").glob(f"*/*/{WARM_MARKER}"))


@pytest.fixture(scope="module")
async def pooled(database_url: str) -> AsyncIterator[Harness]:
    h = await start_harness(database_url, extra_tenants=twin_tenants(1))
    h.sandbox.add_script(
        "glob_then_answer",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Glob", {"pattern": "*.txt"})],
                    usage=Usage(input_tokens=800, output_tokens=30),
                ),
                Step(text="There is hello.txt.", usage=Usage(input_tokens=900, output_tokens=12)),
            ]
        ),
    )
    yield h
    await stop_harness(h)


def pool(h: Harness) -> Any:
    assert h.app.sessions.pool is not None
    return h.app.sessions.pool


# What differs between any two sessions: ids, times, the tenant and its folder.
_VARYING = {
    "sessionId",
    "session_id",
    "id",
    "uuid",
    "createTime",
    "startTime",
    "endTime",
    "time",
    "tenant",
    "sdkSessionId",
    "traceId",
    "toolUseId",
    "tool_use_id",
    "durationMs",
    "duration_ms",
    "duration_api_ms",
    "cwd",
    "original_cwd",
    "memory_paths",
    "messaging_socket_path",
}


def comparable(events: list[session_pb2.SessionEvent]) -> list[Any]:
    """Events without what differs between any two sessions (ids, times, tenant)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(json.loads(v) if k.endswith("Json") else v)
                for k, v in value.items()
                if k not in _VARYING
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return [strip(json_format.MessageToDict(e)) for e in events]


async def test_a_hit_streams_and_persists_exactly_what_a_cold_start_does(pooled: Harness) -> None:
    await until(lambda: pool(pooled).ready("warm") == 1)
    waiting = pool(pooled)._ready["warm"][0].session_id
    before = pool(pooled).stats["warm"].hits

    warm = await run(pooled, "warm", prompt="[[sandbox:glob_then_answer]] list the text files")
    cold = await run(pooled, "cold", prompt="[[sandbox:glob_then_answer]] list the text files")

    assert pool(pooled).stats["warm"].hits == before + 1
    assert warm[0].session_id == waiting  # the warm agent was made for this very session
    assert comparable(warm) == comparable(cold)
    assert warm[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert warm[-1].result.session.result == "There is hello.txt."
    assert any(e.HasField("tool_use") for e in warm)

    stored = {}
    for tenant, events in (("warm", warm), ("cold", cold)):
        got = await pooled.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=events[0].session_id), metadata=auth(tenant)
        )
        listed = pooled.sessions.StreamSession(
            session_pb2.StreamSessionRequest(session_id=events[0].session_id), metadata=auth(tenant)
        )
        assert comparable([e async for e in listed]) == comparable(events)
        stored[tenant] = json_format.MessageToDict(got)
    for record in stored.values():
        for key in (
            "id",
            "tenant",
            "createTime",
            "startTime",
            "endTime",
            "sdkSessionId",
            "traceId",
        ):
            record.pop(key, None)
    assert stored["warm"] == stored["cold"]

    # The used agent is gone, with its folder; a new one (another id) takes its place.
    assert agent_processes(pooled.work_dir / "w" / "warm" / waiting.replace("-", "")[:16]) == []
    assert not (pooled.work_dir / "w" / "warm" / waiting.replace("-", "")[:16]).exists()
    await until(lambda: pool(pooled).ready("warm") == 1)
    assert pool(pooled)._ready["warm"][0].session_id != waiting


async def test_requests_off_the_defaults_start_cold_and_leave_the_pool_alone(
    pooled: Harness,
) -> None:
    await until(lambda: pool(pooled).ready("warm") == 1)
    waiting = pool(pooled)._ready["warm"][0].session_id
    misses = pool(pooled).stats["warm"].misses

    events = await run(pooled, "warm", prompt="[[sandbox:glob_then_answer]] go", max_turns=3)

    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert events[0].session_id != waiting
    assert pool(pooled).stats["warm"].misses == misses + 1
    assert pool(pooled)._ready["warm"][0].session_id == waiting


async def test_a_repeated_request_id_gives_the_agent_back_unused(pooled: Harness) -> None:
    request_id = str(uuid.uuid4())
    await until(lambda: pool(pooled).ready("warm") == 1)
    first = await run(
        pooled, "warm", prompt="[[sandbox:glob_then_answer]] go", request_id=request_id
    )
    await until(lambda: pool(pooled).ready("warm") == 1)
    waiting = pool(pooled)._ready["warm"][0].session_id
    stats = pool(pooled).stats["warm"]
    hits, misses = stats.hits, stats.misses

    again = await run(
        pooled, "warm", prompt="[[sandbox:glob_then_answer]] go", request_id=request_id
    )

    assert again[0].session_id == first[0].session_id
    assert (stats.hits, stats.misses) == (hits, misses)  # a re-attach is neither
    assert [a.session_id for a in pool(pooled)._ready["warm"]] == [waiting]


async def test_the_pool_never_hands_one_agent_to_two_sessions(database_url: str) -> None:
    h = await start_harness(database_url, extra_tenants=twin_tenants(2))
    try:
        for i in range(6):
            h.sandbox.add_script(
                f"own{i}",
                Script(
                    steps=[
                        Step(
                            text=f"answer {i}",
                            delay_s=0.3,
                            usage=Usage(input_tokens=50, output_tokens=5),
                        ),
                    ]
                ),
            )
        await until(lambda: pool(h).ready("warm") == 2)
        made = {a.session_id for a in pool(h)._ready["warm"]}

        runs = await asyncio.gather(
            *(run(h, "warm", prompt=f"[[sandbox:own{i}]] go") for i in range(6))
        )

        ids = [events[0].session_id for events in runs]
        assert len(set(ids)) == 6
        for i, events in enumerate(runs):
            final = events[-1].result.session
            assert final.state == session_pb2.SESSION_STATE_COMPLETE, final
            assert final.result == f"answer {i}"
            assert [e.session_id for e in events] == [ids[i]] * len(events)
        stats = pool(h).stats["warm"]
        assert stats.hits + stats.misses == 6
        assert 2 <= stats.hits <= stats.started
        served_warm = made & set(ids)
        assert served_warm == made  # both waiting agents served, each exactly one session
        # Each prompt reached the model once: no agent answered for two sessions.
        assert [len(h.sandbox.find(script=f"own{i}")) for i in range(6)] == [1] * 6
    finally:
        await stop_harness(h)


def sqlite(tmp_path: Path) -> str:
    """Tests of the pool alone: the database does not matter, one backend is enough."""
    return f"sqlite:///{tmp_path}/agentplane.db"


async def test_shutdown_leaves_no_agent_process_and_no_folder(tmp_path: Path) -> None:
    h = await start_harness(sqlite(tmp_path), extra_tenants=twin_tenants(2))
    try:
        await until(lambda: pool(h).ready("warm") == 2)
        assert len(warm_markers(h)) == 2
        assert agent_processes(h.work_dir / "w") != []  # the CLIs are up and waiting

        await h.app.stop(grace=1)

        assert agent_processes(h.work_dir / "w") == []
        assert warm_markers(h) == []
        assert pool(h).stats["warm"].discarded == 2
    finally:
        await stop_harness(h)  # stopping twice is harmless; it checks for processes again


async def test_shutdown_while_an_agent_is_starting_leaves_nothing(tmp_path: Path) -> None:
    h = await start_harness(sqlite(tmp_path), extra_tenants=twin_tenants(3))
    try:
        await until(lambda: pool(h).ready("warm") == 1)  # the next one is starting now
        assert pool(h).size > pool(h).ready("warm")

        await h.app.stop(grace=1)

        assert agent_processes(h.work_dir / "w") == []
        assert warm_markers(h) == []
        assert pool(h).size == 0
    finally:
        await stop_harness(h)


async def test_the_pool_stays_within_the_session_limit_and_replaces_old_agents(
    tmp_path: Path,
) -> None:
    # Agents older than max_age_s are replaced. A loaded machine may take longer to start
    # one than any short age: the age is cut only once both agents are ready, and restored
    # once both were replaced, so the test waits on those events, not on a race of the age
    # against the CLI's start-up.
    h = await start_harness(sqlite(tmp_path), extra_tenants=twin_tenants(3), max_sessions=2)
    warm = pool(h)

    def within_limit(condition: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            assert warm.size <= 2  # never the third: max_sessions is 2
            return condition()

        return check

    def aged(max_age_s: float) -> None:
        warm.config = replace(warm.config, max_age_s=max_age_s)
        warm._wake.set()  # the refill loop re-checks the ages now

    try:
        await until(within_limit(lambda: warm.ready("warm") == 2), timeout=120)
        first = {a.session_id for a in warm._ready["warm"]}
        gone = warm.stats["warm"].discarded
        aged(0.05)  # both are too old now
        await until(within_limit(lambda: warm.stats["warm"].discarded >= gone + 2), timeout=120)
        aged(600)
        await until(
            within_limit(
                lambda: (
                    warm.ready("warm") == 2
                    and first.isdisjoint(a.session_id for a in warm._ready["warm"])
                )
            ),
            timeout=120,
        )
        for session_id in first:
            assert (
                agent_processes(h.work_dir / "w" / "warm" / session_id.replace("-", "")[:16]) == []
            )
    finally:
        await stop_harness(h)


async def test_start_up_sweeps_what_dead_servers_left(tmp_path: Path) -> None:
    """Warm agents and sessions alike: a folder whose owner's mark names a dead server (or
    a pid now reused by another process) is removed with its processes."""
    h = await start_harness(sqlite(tmp_path), extra_tenants=twin_tenants(1))
    try:
        dead = await asyncio.create_subprocess_exec("true")  # a pid no process has now
        await dead.wait()
        tenant_dir = h.work_dir / "w" / "warm"
        orphan = tenant_dir / "0123456789abcdef"
        (orphan / "work").mkdir(parents=True)
        (orphan / WARM_MARKER).write_text("")
        (tenant_dir / "0123456789abcdef.owner").write_text(f"{dead.pid} 1")
        sleeper = await asyncio.create_subprocess_exec(  # stands for the dead server's CLI
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            env={**os.environ, "AGENTPLANE_SESSION_DIR": str(orphan)},
        )
        # A live pid whose start time is not the mark's: the pid was reused.
        reused = tenant_dir / "cccccccccccccccc"
        reused.mkdir()
        (tenant_dir / "cccccccccccccccc.owner").write_text(f"{sleeper.pid} 1")
        ours = tenant_dir / "fedcba9876543210"
        ours.mkdir()
        write_marker(tenant_dir / "fedcba9876543210.owner")
        unmarked = tenant_dir / "dddddddddddddddd"  # a release before marks: left alone
        unmarked.mkdir()
        # A mark that would hang or flood a naive read.
        for name, plant in (
            ("aaaaaaaaaaaaaaaa", lambda m: m.symlink_to("/dev/zero")),
            ("bbbbbbbbbbbbbbbb", os.mkfifo),
        ):
            (tenant_dir / name).mkdir()
            plant(tenant_dir / f"{name}.owner")

        assert await asyncio.wait_for(h.app.sessions.folders.sweep(), 30) == 4

        assert await asyncio.wait_for(sleeper.wait(), 10) != 0
        left = {p.name for p in tenant_dir.iterdir()}
        for name in (
            "0123456789abcdef",
            "cccccccccccccccc",
            "aaaaaaaaaaaaaaaa",
            "bbbbbbbbbbbbbbbb",
        ):
            assert name not in left and f"{name}.owner" not in left
        assert {"dddddddddddddddd", "fedcba9876543210", "fedcba9876543210.owner"} <= left
        for path in (ours, unmarked):
            path.rmdir()
        (tenant_dir / "fedcba9876543210.owner").unlink()
    finally:
        await stop_harness(h)


async def test_an_unpriced_warm_pool_model_stops_the_server_at_start(tmp_path: Path) -> None:
    from agentplane.server.app import App
    from agentplane.server.config import Settings
    from agentplane.server.tenants import TenantRegistry

    unpriced = twin_tenants(1).replace('"claude-sonnet-4-5"', '"no-such-model"', 1)
    tenants = write_tenants(tmp_path, unpriced)
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=sqlite(tmp_path),
        tenants_file=tenants,
        work_dir=tmp_path / "w",
    )
    with pytest.raises(ConfigError, match="tenants.warm.warm_pool_model"):
        await App.start(settings, TenantRegistry.load(tenants))


def running_agents(h: Harness) -> int:
    """How many sessions' agents (warm or not) have processes now."""
    marker = b"AGENTPLANE_SESSION_DIR="
    return len({v for p in processes(h.work_dir / "w") for v in p.env if v.startswith(marker)})


async def test_warm_agents_and_sessions_together_never_exceed_the_session_limit(
    tmp_path: Path,
) -> None:
    h = await start_harness(sqlite(tmp_path), extra_tenants=twin_tenants(2), max_sessions=3)
    h.sandbox.add_script("hang", Script(steps=[Step(hang=True)]))
    most, sampling = 0, True

    async def sample() -> None:
        nonlocal most
        while sampling:
            most = max(most, await asyncio.to_thread(running_agents, h))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    calls = []
    try:
        await until(lambda: pool(h).ready("warm") == 2)
        # Two places are the pool's; a cold session gets the one left, the next none.
        cold = h.sessions.RunSession(
            session_pb2.RunSessionRequest(
                prompt="[[sandbox:hang]] wait", model="claude-sonnet-4-5"
            ),
            metadata=auth("cold"),
        )
        calls.append(cold)
        assert (await cold.read()).HasField("started")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run(h, "cold", prompt="[[sandbox:hang]] one too many")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(caught.value)["ErrorInfo"].reason == "REPLICA_FULL"

        # A session the pool serves takes a waiting agent's place; none starts to refill.
        warm = h.sessions.RunSession(
            session_pb2.RunSessionRequest(
                prompt="[[sandbox:hang]] wait", model="claude-sonnet-4-5"
            ),
            metadata=auth("warm"),
        )
        calls.append(warm)
        assert (await warm.read()).HasField("started")
        await asyncio.sleep(1.0)  # time enough for a refill, which must not come
        assert pool(h).stats["warm"].hits == 1
        assert pool(h).size == 1

        for call in calls:
            call.cancel()  # on_disconnect CANCEL: both sessions end
        await until(lambda: h.app.sessions.live_count == 0)
        await until(lambda: pool(h).ready("warm") == 2)  # refilled once there is room
    finally:
        sampling = False
        await sampler
        await stop_harness(h)
    assert most == 3  # the limit, reached and never passed


async def test_a_reload_retires_agents_started_under_a_changed_policy(database_url: str) -> None:
    from harness import tenants_toml

    h = await start_harness(database_url, extra_tenants=twin_tenants(1))
    h.sandbox.add_script("reload_warm", Script(steps=[Step(text="new", usage=Usage(100, 5))]))
    try:
        await until(lambda: pool(h).ready("warm") == 1)
        before = pool(h).stats["warm"]
        started, discarded = before.started, before.discarded
        (h.work_dir / "tenants.toml").write_text(
            "\n".join(
                [
                    tenants_toml(h.workspace),
                    twin_tenants(1).replace(
                        "You are a careful assistant.", "You are a NEW assistant."
                    ),
                    tenant_toml(
                        "warm2",
                        "warm2-token",
                        anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
                        warm_pool_size=1,
                        warm_pool_model="claude-sonnet-4-5",
                    ),
                ]
            )
        )
        changes = await h.app.reload_tenants("test")
        assert changes is not None and changes.added == ("warm2",)
        assert changes.changed["warm"] == ("system_prompt",)

        # The agent started with the old prompt is closed; one with the new one replaces it,
        # and the new tenant's pool fills.
        await until(lambda: pool(h).stats["warm"].discarded == discarded + 1)
        await until(
            lambda: pool(h).stats["warm"].started == started + 1 and pool(h).ready("warm") == 1
        )
        await until(lambda: pool(h).ready("warm2") == 1)
        events = await run(h, "warm", prompt="[[sandbox:reload_warm]] hi")
        assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
        assert pool(h).stats["warm"].hits == 1
        systems = json.dumps(
            [r.body.get("system") for r in h.sandbox.find(script="reload_warm") if r.body]
        )
        assert "NEW assistant" in systems and "careful" not in systems
    finally:
        await stop_harness(h)
