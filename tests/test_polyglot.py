"""A Node.js caller (@grpc/grpc-js + @grpc/proto-loader, from protos/ alone) runs a session."""

from __future__ import annotations

import asyncio
import json
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from agentplane.server.sandbox.script import Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2
from harness import MODEL, TOKENS, Harness

POLYGLOT = Path(__file__).parent / "polyglot"
NODE = shutil.which("node")


async def run(*argv: str, cwd: Path = POLYGLOT, timeout: float = 120) -> tuple[int, str, str]:
    """A subprocess that does not block the event loop serving the in-process server."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def node_modules() -> None:
    """Install the locked dependencies once (npm ci), or skip saying why not."""
    if (POLYGLOT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not on PATH: cannot install tests/polyglot's dependencies")
    code, out, err = await run(npm, "ci", "--no-audit", "--no-fund", timeout=300)
    if code != 0:
        pytest.skip(f"`npm ci` failed in tests/polyglot (exit {code}): {(err or out)[-500:]}")


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_runs_a_session_from_the_protos_alone(harness: Harness) -> None:
    await node_modules()
    harness.sandbox.add_script(
        "polyglot",
        Script(steps=[
            Step(tool_calls=[ToolCall("Read", {"file_path": str(harness.workspace / "hello.txt")})],
                 usage=Usage(1200, 40)),
            Step(text="Hello from the sandbox to Node.", usage=Usage(1500, 20)),
        ]),
    )

    assert NODE is not None
    code, out, err = await run(
        NODE, "run_session.js", "--target", f"127.0.0.1:{harness.app.port}",
        "--token", TOKENS["acme"], "--model", MODEL, "--budget", "0.5",
        "--prompt", "[[sandbox:polyglot]] read hello.txt and greet me",
    )

    assert code == 0, (out, err)
    lines = out.splitlines()
    assert len(lines) == 1, out
    summary = json.loads(lines[0])
    assert summary["health"] == "SERVING" and summary["tenant"] == "acme"
    kinds = summary["kinds"]
    assert kinds[0] == "started" and kinds[-1] == "result"
    assert {"state_change", "tool_use", "tool_result", "assistant_text"} <= set(kinds)
    assert summary["seqs"] == list(range(1, len(kinds) + 1))
    assert summary["state"] == "SESSION_STATE_COMPLETE"
    assert Decimal(summary["cost_usd"]) > 0
    assert summary["result"] == "Hello from the sandbox to Node."
    assert summary["input_tokens"] >= 2700

    # The same session, seen from Python.
    session = await harness.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=summary["session_id"]),
        metadata=harness.auth("acme"),
    )
    assert session.cost_usd == summary["cost_usd"]


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_with_a_bad_token_gets_unauthenticated(harness: Harness) -> None:
    await node_modules()
    assert NODE is not None

    code, out, _ = await run(
        NODE, "run_session.js", "--target", f"127.0.0.1:{harness.app.port}",
        "--token", "not-a-token", "--prompt", "hi",
    )

    summary = json.loads(out)
    assert code == 3 and summary["health"] == "SERVING"
    assert summary["error"]["code"] == "UNAUTHENTICATED" and summary["kinds"] == []
