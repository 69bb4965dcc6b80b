"""The metering gateway flooded from inside a session's sandbox, as a hostile tenant would.

The gateway runs in the server process, outside every session's cgroup: bodies of 48 MiB
posted to it at the session's ANTHROPIC_BASE_URL, with the session's own token, must be
refused before they are buffered, while the server stays small and answers, and another
tenant's session runs on.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import TOKENS, Harness, start_harness, stop_harness, tenant_toml

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(os.geteuid() != 0, reason="the session sandbox needs root"),
]

TOKENS.update({"flooder": "flooder-token-1", "bystander": "bystander-token-2"})
MIB = 1024 * 1024

# Run inside the sandbox: six 48 MiB bodies at once, to each route of the gateway, with a
# Content-Length and chunked (the gateway cannot see the size of those before reading).
FLOOD = textwrap.dedent(
    """
    import http.client, json, os, threading, urllib.parse
    base = urllib.parse.urlsplit(os.environ["ANTHROPIC_BASE_URL"])
    key = os.environ["ANTHROPIC_API_KEY"]
    def body():
        block = b" " * (1 << 20)
        for _ in range(48):
            yield block
    def post(path, chunked):
        way = "chunked" if chunked else "length"
        conn = http.client.HTTPConnection(base.hostname, base.port, timeout=120)
        headers = {"x-api-key": key, "content-type": "application/json"}
        try:
            if chunked:
                conn.request("POST", path, body=body(), headers=headers, encode_chunked=True)
            else:
                headers["content-length"] = str(48 << 20)
                conn.request("POST", path, body=body(), headers=headers)
            reply = conn.getresponse()
            kind = json.loads(reply.read())["error"]["type"]
            print("FLOOD", path, way, reply.status, kind, flush=True)
        except Exception as exc:
            print("FLOOD", path, way, "failed", type(exc).__name__, exc, flush=True)
    posts = [
        ("/v1/messages", False), ("/v1/messages", False), ("/v1/messages", True),
        ("/v1/messages/count_tokens", False), ("/mcp/crm/mcp", False), ("/mcp/crm/mcp", True),
    ]
    threads = [threading.Thread(target=post, args=p) for p in posts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("FLOODED", flush=True)
    """
)


@pytest.fixture(scope="module")
async def h(database_url: str) -> AsyncIterator[Harness]:
    key = "AGENTPLANE_TEST_ACME_KEY"
    tables = [
        tenant_toml(
            "flooder", TOKENS["flooder"], anthropic_api_key_env=key, allowed_tools=["Bash"]
        ),
        tenant_toml(
            "bystander", TOKENS["bystander"], anthropic_api_key_env=key, allowed_tools=["Bash"]
        ),
    ]
    harness = await start_harness(database_url, extra_tenants="\n".join(tables))
    yield harness
    await stop_harness(harness)


def vm_rss_mib() -> float:
    """This process's resident memory (the server runs in it, see harness.py)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def bash(h: Harness, name: str, command: str) -> str:
    h.sandbox.add_script(
        name,
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Bash", {"command": command, "timeout": 300000})],
                    usage=Usage(input_tokens=1000, output_tokens=50),
                ),
                Step(text="done", usage=Usage(input_tokens=1200, output_tokens=20)),
            ]
        ),
    )
    return f"[[sandbox:{name}]] go"


def tool_output(events: list[session_pb2.SessionEvent]) -> str:
    return "\n".join(e.tool_result.content for e in events if e.HasField("tool_result"))


async def test_48_mib_bodies_are_refused_and_the_server_stays_small_and_answers(
    h: Harness,
) -> None:
    health = health_pb2_grpc.HealthStub(h.channel)
    await h.run("flooder", prompt=bash(h, "warm", "echo warm"))  # imports, first sandbox
    baseline = vm_rss_mib()
    peak = baseline
    answered = 0
    flooding = True

    async def watch() -> None:  # health answers throughout; RSS is sampled meanwhile
        nonlocal peak, answered
        while flooding:
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=30
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            answered += 1
            peak = max(peak, vm_rss_mib())
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    flood, bystander = await asyncio.gather(
        h.run("flooder", prompt=bash(h, "flood", f"python3 - <<'EOF'\n{FLOOD}\nEOF")),
        h.run("bystander", prompt=bash(h, "bystand", "sleep 2; echo fine")),
    )
    flooding = False
    await watcher
    out = tool_output(flood)
    assert "FLOODED" in out, out
    results = [line.split()[1:] for line in out.splitlines() if line.startswith("FLOOD ")]
    assert len(results) == 6, out
    for path, way, status, kind in results:
        assert (status, kind) == ("413", "request_too_large"), (path, way, out)
    assert flood[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    # Another tenant's session ran on meanwhile.
    assert bystander[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert "fine" in tool_output(bystander)
    # 6 * 48 MiB were posted; the server read at most two chunked bodies up to the cap.
    assert peak - baseline < 100, (baseline, peak)
    assert answered > 0, f"no health answer in {time.monotonic() - started:.1f} s"
