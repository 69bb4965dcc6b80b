"""Tenant MCP servers against the real CLI, in the real sandbox: a stdio server (inside the
session's sandbox), a streamable-HTTP and an SSE server on loopback (reached through the
gateway's relay), all built with the official `mcp` package (tests/mcp_servers.py). The
sandbox model is scripted to call their tools; what the agent got is read from its
tool_result events."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplane.server.model_double import Script, Step, ToolCall
from agentplane.server.store.engine import sessionmaker
from agentplane.server.store.models import Base
from agentplane.v1 import session_pb2
from harness import MODEL, TOKENS, Harness, error_details, hash_token, start_harness, stop_harness
from sqlalchemy import select
from test_server_process import free_port

pytestmark = pytest.mark.asyncio

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "mcp_servers.py"
BEARER = "mcp-bearer-secret-5f1c9a"  # the remote server's token: never stored or shown
REGION = "eu-west-7"  # the stdio server's variable (it runs in the sandbox: the agent may see it)
os.environ["AGENTPLANE_TEST_MCP_TOKEN"] = BEARER
os.environ["AGENTPLANE_TEST_CRM_REGION"] = REGION
TOKENS.update(mcp="mcp-token-8", mcpbroken="mcpbroken-token-9", mcpnosecret="mcpnosecret-10")


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert process.poll() is None, "the MCP server exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def remote_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The streamable-HTTP and SSE servers, each its own process; their header logs."""
    folder = tmp_path_factory.mktemp("mcp")
    found: dict[str, Any] = {}
    processes = []
    try:
        for kind in ("http", "sse"):
            port, log = free_port(), folder / f"{kind}.log"
            process = subprocess.Popen([sys.executable, str(SERVERS), kind, str(port), str(log)])
            processes.append(process)
            wait_for_port(port, process)
            found[kind] = (port, log)
        yield found
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


@pytest.fixture(scope="module")
async def silent_port() -> AsyncIterator[int]:
    """A listener that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    async with listener:
        yield listener.sockets[0].getsockname()[1]
        for writer in held:
            writer.close()


def tenants(http_port: int, sse_port: int, silent: int) -> str:
    python = json.dumps(sys.executable)
    # What the stdio server needs inside the sandbox: the interpreter, the virtualenv with
    # the mcp package, and its script.
    paths = json.dumps(sorted({sys.base_prefix, sys.prefix, str(HERE)}))
    key = 'anthropic_api_key_env = "AGENTPLANE_TEST_ACME_KEY"'
    return f"""
[tenants.mcp]
token_sha256 = ["{hash_token(TOKENS["mcp"])}"]
{key}
allowed_tools = ["Bash", "mcp__crm", "mcp__remote__ping", "mcp__legacy"]
max_turns = 6
daily_limit_usd = 100.0
max_concurrent_sessions = 8

[tenants.mcp.mcp_servers.crm]
command = {python}
args = [{json.dumps(str(SERVERS))}, "stdio"]
env = {{ CRM_REGION = {{ env = "AGENTPLANE_TEST_CRM_REGION" }} }}
paths = {paths}

[tenants.mcp.mcp_servers.remote]
type = "http"
url = "http://127.0.0.1:{http_port}/mcp"
headers = {{ Authorization = {{ env = "AGENTPLANE_TEST_MCP_TOKEN", prefix = "Bearer " }}, X-Team = "acme" }}

[tenants.mcp.mcp_servers.legacy]
type = "sse"
url = "http://127.0.0.1:{sse_port}/sse"

[tenants.mcpbroken]
token_sha256 = ["{hash_token(TOKENS["mcpbroken"])}"]
{key}
allowed_tools = ["mcp__refused", "mcp__silent", "mcp__crashes"]
mcp_timeout_s = 3

[tenants.mcpbroken.mcp_servers.refused]
type = "http"
url = "http://127.0.0.1:{free_port()}/mcp"

[tenants.mcpbroken.mcp_servers.silent]
type = "http"
url = "http://127.0.0.1:{silent}/mcp"

[tenants.mcpbroken.mcp_servers.crashes]
command = "/bin/false"

[tenants.mcpnosecret]
token_sha256 = ["{hash_token(TOKENS["mcpnosecret"])}"]
{key}
allowed_tools = ["mcp__remote"]

[tenants.mcpnosecret.mcp_servers.remote]
type = "http"
url = "http://127.0.0.1:{http_port}/mcp"
headers = {{ Authorization = {{ env = "AGENTPLANE_TEST_UNSET_MCP_TOKEN" }} }}
"""


@pytest.fixture(scope="module")
async def h(
    database_url: str, remote_servers: dict[str, Any], silent_port: int
) -> AsyncIterator[Harness]:
    harness = await start_harness(
        database_url,
        extra_tenants=tenants(remote_servers["http"][0], remote_servers["sse"][0], silent_port),
    )
    yield harness
    await stop_harness(harness)


def start(h: Harness, tenant: str, script: str, steps: list[Step], **fields: Any) -> Any:
    h.sandbox.add_script(script, Script(steps=steps))
    return h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", model=MODEL, **fields),
        metadata=h.auth(tenant),
    )


async def run(
    h: Harness, tenant: str, script: str, steps: list[Step], **fields: Any
) -> list[session_pb2.SessionEvent]:
    return [e async for e in start(h, tenant, script, steps, **fields)]


def results(events: list[session_pb2.SessionEvent]) -> dict[str, session_pb2.ToolResult]:
    """Tool results by the name of the tool called."""
    names = {e.tool_use.tool_use_id: e.tool_use.name for e in events if e.HasField("tool_use")}
    return {
        names[e.tool_result.tool_use_id]: e.tool_result for e in events if e.HasField("tool_result")
    }


def init(events: list[session_pb2.SessionEvent]) -> dict[str, Any]:
    (data,) = [
        json.loads(e.system.data_json)
        for e in events
        if e.HasField("system") and e.system.subtype == "init"
    ]
    return data


def bash(command: str) -> Step:
    return Step(tool_calls=[ToolCall("Bash", {"command": command})])


async def test_the_tenants_servers_tools_answer_the_agent(
    h: Harness,
    remote_servers: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    events = await run(
        h,
        "mcp",
        "mcp_all",
        [
            Step(
                tool_calls=[
                    ToolCall("mcp__crm__lookup", {"email": "ada@example.com"}),
                    ToolCall("mcp__crm__region", {}),
                    ToolCall("mcp__remote__ping", {"x": "over http"}),
                    ToolCall("mcp__legacy__echo", {"x": "over sse"}),
                ]
            ),
            Step(text="all answered"),
        ],
    )
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    got = results(events)
    assert not any(r.is_error for r in got.values()), got
    assert "Ada Lovelace" in got["mcp__crm__lookup"].content
    assert f"region={REGION}" in got["mcp__crm__region"].content  # {env} reached the server
    assert "pong over http" in got["mcp__remote__ping"].content
    assert "echo over sse" in got["mcp__legacy__echo"].content
    started = init(events)
    assert {(s["name"], s["status"]) for s in started["mcp_servers"]} == {
        ("crm", "connected"),
        ("remote", "connected"),
        ("legacy", "connected"),
    }
    assert {
        "mcp__crm__lookup",
        "mcp__crm__delete",
        "mcp__remote__ping",
        "mcp__legacy__echo",
    } <= set(started["tools"])

    # The remote server got the tenant's headers, not the session's gateway token.
    seen = [
        json.loads(line)["headers"] for line in remote_servers["http"][1].read_text().splitlines()
    ]
    assert seen and all(s.get("authorization") == f"Bearer {BEARER}" for s in seen)
    assert all(s.get("x-team") == "acme" and "x-api-key" not in s for s in seen)
    # The secret is nowhere else: not in events, the database or the logs.
    assert BEARER not in "".join(str(e) for e in events)
    async with sessionmaker(h.app.engine)() as db:
        for table in Base.metadata.sorted_tables:
            for row in (await db.execute(select(table))).all():
                assert BEARER not in repr(row), table.name
    assert BEARER not in caplog.text


async def test_a_request_narrows_the_servers_tools_to_what_it_names(h: Harness) -> None:
    events = await run(
        h,
        "mcp",
        "mcp_narrow",
        [
            Step(
                tool_calls=[
                    ToolCall("mcp__crm__lookup", {"email": "ada@example.com"}),
                    ToolCall("mcp__crm__delete", {"email": "ada@example.com"}),
                    ToolCall("mcp__remote__ping", {"x": "not mine"}),
                ]
            ),
            Step(text="done"),
        ],
        allowed_tools=["mcp__crm__lookup"],
    )
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert list(events[0].started.session.allowed_tools) == ["mcp__crm__lookup"]
    got = results(events)
    assert not got["mcp__crm__lookup"].is_error
    assert got["mcp__crm__delete"].is_error and "deleted" not in got["mcp__crm__delete"].content
    assert got["mcp__remote__ping"].is_error and "pong" not in got["mcp__remote__ping"].content
    # Only the servers of its tools were started.
    assert [s["name"] for s in init(events)["mcp_servers"]] == ["crm"]


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        (["mcp__remote__other"], "allowed_tools"),  # the tenant allows remote's ping only
        (["mcp__remote"], "allowed_tools"),
        (["mcp__nosuch__x"], "allowed_tools"),
        (["mcp__caller__x"], "allowed_tools"),
    ],
)
async def test_tools_outside_the_tenants_servers_are_invalid(
    h: Harness, tools: list[str], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(h, "mcp", "mcp_never", [Step(text="x")], allowed_tools=tools)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)["BadRequest"].field_violations[0].field == field


async def test_an_approval_rule_on_an_mcp_tool_asks_the_caller(h: Harness) -> None:
    call = start(
        h,
        "mcp",
        "mcp_approve",
        [
            Step(
                tool_calls=[
                    ToolCall("mcp__crm__delete", {"email": "ada@example.com"}),
                    ToolCall("mcp__crm__lookup", {"email": "bob@example.com"}),
                ]
            ),
            Step(text="ok"),
        ],
        require_approval=["mcp__crm__delete"],
    )
    events = []
    while not (events and events[-1].HasField("input_request")):
        events.append(await call.read())
    asked = events[-1].input_request
    assert asked.kind == session_pb2.INPUT_KIND_PERMISSION
    assert asked.tool_name == "mcp__crm__delete"
    assert json.loads(asked.input_json) == {"email": "ada@example.com"}
    await h.sessions.Respond(
        session_pb2.RespondRequest(
            session_id=events[0].session_id,
            request_id=asked.request_id,
            permission=session_pb2.PermissionDecision(allow=False, message="never delete"),
        ),
        metadata=h.auth("mcp"),
    )
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    got = results(events)
    assert got["mcp__crm__delete"].is_error and "never delete" in got["mcp__crm__delete"].content
    assert "Ada" not in got["mcp__crm__delete"].content
    assert "bob@example.com" in got["mcp__crm__lookup"].content  # no rule: it just ran
    assert len([e for e in events if e.HasField("input_request")]) == 1

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # a rule must name a session's tool
        await run(
            h,
            "mcp",
            "mcp_never",
            [Step(text="x")],
            allowed_tools=["mcp__crm__lookup"],
            require_approval=["mcp__crm__delete"],
        )
    assert error_details(caught.value)["BadRequest"].field_violations[0].field == (
        "require_approval[0]"
    )


async def test_the_sandbox_reaches_its_tenants_endpoints_only_through_the_gateway(
    h: Harness,
    remote_servers: dict[str, Any],
) -> None:
    port = remote_servers["http"][0]
    gateway = f"http://127.0.0.1:{h.app.gateway.port}"
    probe = (
        f"(echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo 'direct OPEN' "
        "|| echo 'direct closed'; env | grep -c mcp-bearer || true; "
        # Through the relay with its own token: its servers only (it has none of remote's
        # tools here), whatever it asks for.
        + "; ".join(
            f"echo {name} $(curl -s -o /dev/null -w '%{{http_code}}' -X POST "
            f"-H \"x-api-key: $ANTHROPIC_API_KEY\" -H 'content-type: application/json' "
            f"-d '{{}}' {gateway}/mcp/{name}/mcp)"
            for name in ("remote", "refused", "nosuch")
        )
    )
    events = await run(
        h,
        "mcp",
        "mcp_probe",
        [bash(probe), Step(text="done")],
        allowed_tools=["Bash", "mcp__crm__lookup"],
    )
    out = results(events)["Bash"].content
    assert "direct closed" in out, out
    assert "remote 404" in out and "refused 404" in out and "nosuch 404" in out, out
    assert out.split("direct closed", 1)[1].split()[0] == "0"  # no bearer in its environment

    # With remote's tool, the session's own token gets it through (and the tenant's header).
    before = len(remote_servers["http"][1].read_text().splitlines())
    events = await run(h, "mcp", "mcp_probe_own", [bash(probe), Step(text="done")])
    out = results(events)["Bash"].content
    assert "direct closed" in out and "refused 404" in out, out
    assert "remote 404" not in out and "remote 502" not in out, out
    lines = remote_servers["http"][1].read_text().splitlines()[before:]
    assert any(
        json.loads(line)["headers"].get("authorization") == f"Bearer {BEARER}" for line in lines
    )


async def test_servers_that_fail_or_never_answer_end_the_session_with_a_clear_error(
    h: Harness,
) -> None:
    events = await run(h, "mcpbroken", "mcp_broken", [Step(text="never reached")])
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_AGENT_FAILED
    for name in ("refused", "silent", "crashes"):
        assert name in final.error.message, final.error.message
    assert "did not start or answer" in final.error.message
    statuses = {s["name"]: s["status"] for s in init(events)["mcp_servers"]}
    assert statuses == {"refused": "failed", "silent": "failed", "crashes": "failed"}
    assert not [e for e in events if e.HasField("assistant_text")]


async def test_a_missing_header_secret_refuses_the_session_before_it_starts(h: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(h, "mcpnosecret", "mcp_never", [Step(text="x")])
    err = caught.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "AGENTPLANE_TEST_UNSET_MCP_TOKEN is not set" in err.details()
    assert "header Authorization" in err.details()
