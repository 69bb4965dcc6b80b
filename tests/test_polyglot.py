"""A Node.js caller (@grpc/grpc-js + @grpc/proto-loader, from protos/ alone) runs a session,
with agentplane's service config: past a draining replica too; with a schema, files in and
artifacts out."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import random
import shutil
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
import test_budget_pause as pause
from agentplane import service_config
from agentplane.server.model_double.script import Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2
from harness import (
    MODEL,
    TOKENS,
    Harness,
    agent_processes,
    start_harness,
    stop_harness,
    tenant_toml,
)
from model_view import BASH_COMMAND, BASH_ID, BASH_OUTPUT, LOOKUP_ID, tool_results_seen
from tls_certs import CertificateAuthority
from webhook_receiver import WebhookReceiver, new_secret

POLYGLOT = Path(__file__).parent / "polyglot"
NODE = shutil.which("node")


async def run(
    *argv: str, cwd: Path = POLYGLOT, timeout: float = 120, stdin: str | None = None
) -> tuple[int, str, str]:
    """A subprocess that does not block the event loop serving the in-process server."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def node_modules() -> None:
    """Install the locked dependencies once (npm ci), or skip saying why not."""
    modules = POLYGLOT / "node_modules"
    if (modules / "@grpc" / "grpc-js").is_dir() and (modules / "standardwebhooks").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not on PATH: cannot install tests/polyglot's dependencies")
    code, out, err = await run(npm, "ci", "--no-audit", "--no-fund", timeout=300)
    if code != 0:
        pytest.skip(f"`npm ci` failed in tests/polyglot (exit {code}): {(err or out)[-500:]}")


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_raises_a_paused_budget_and_verifies_a_webhook_in_node(
    database_url: str,
) -> None:
    await node_modules()
    secret = new_secret()
    os.environ[pause.SECRET_ENV] = secret
    receiver = WebhookReceiver(secret)
    await receiver.start()
    h = await start_harness(database_url, extra_tenants=pause.tenants(receiver.base))
    try:
        h.sandbox.add_script("three", pause.THREE)
        assert NODE is not None
        code, out, err = await run(
            NODE,
            "run_session.js",
            "--target",
            f"127.0.0.1:{h.app.port}",
            "--token",
            pause.TOKENS["pauser"],
            "--model",
            MODEL,
            "--budget",
            pause.TWO,
            "--on-budget-exhausted",
            "pause",
            "--raise-to",
            "0.2",
            "--prompt",
            "[[sandbox:three]] go",
        )
        assert code == 0, (out, err)
        summary = json.loads(out)
        assert summary["state"] == "SESSION_STATE_COMPLETE"
        assert [p["reason"] for p in summary["pauses"]] == ["PAUSE_REASON_SESSION_BUDGET"]
        assert summary["raised"] == ["0.200000"]
        assert {"paused", "budget_raised"} <= set(summary["kinds"])
        assert Decimal(summary["cost_usd"]) == 3 * pause.PER_REQUEST

        # The session.paused webhook, as received, verifies in Node; a changed body does not.
        (hook,) = await receiver.wait(lambda r: r.path == "/paused" and r.verified)
        request = {
            "secret": secret,
            "headers": hook.headers,
            "body_base64": base64.b64encode(hook.body).decode(),
        }
        code, out, err = await run(NODE, "verify_webhook.js", stdin=json.dumps(request))
        assert code == 0, (out, err)
        verdict = json.loads(out)
        assert verdict["verified"] is True and verdict["type"] == "session.paused"
        assert verdict["data"]["session"]["id"] == summary["session_id"]
        forged = {**request, "body_base64": base64.b64encode(hook.body + b" ").decode()}
        code, out, _ = await run(NODE, "verify_webhook.js", stdin=json.dumps(forged))
        assert code == 1 and json.loads(out)["verified"] is False
    finally:
        await stop_harness(h)
        await receiver.stop()


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_runs_a_session_from_the_protos_alone(harness: Harness) -> None:
    await node_modules()
    harness.sandbox.add_script(
        "polyglot",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall("Read", {"file_path": str(harness.workspace / "hello.txt")})
                    ],
                    usage=Usage(1200, 40),
                ),
                Step(text="Hello from the sandbox to Node.", usage=Usage(1500, 20)),
            ]
        ),
    )

    assert NODE is not None
    code, out, err = await run(
        NODE,
        "run_session.js",
        "--target",
        f"127.0.0.1:{harness.app.port}",
        "--token",
        TOKENS["acme"],
        "--model",
        MODEL,
        "--budget",
        "0.5",
        "--prompt",
        "[[sandbox:polyglot]] read hello.txt and greet me",
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
async def test_a_node_client_answers_a_caller_tool_and_approves_bash(harness: Harness) -> None:
    await node_modules()
    harness.sandbox.add_script(
        "polyglot_loop",
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("mcp__caller__lookup", {"word": "papaya"}, LOOKUP_ID)],
                    usage=Usage(1000, 30),
                ),
                Step(
                    tool_calls=[ToolCall("Bash", {"command": BASH_COMMAND}, BASH_ID)],
                    usage=Usage(1100, 30),
                ),
                Step(text="Node answered.", usage=Usage(1200, 10)),
            ]
        ),
    )
    tool = {
        "name": "lookup",
        "description": "Looks a word up in the caller's dictionary.",
        "input_schema_json": json.dumps(
            {
                "type": "object",
                "properties": {"word": {"type": "string"}},
                "required": ["word"],
            }
        ),
    }

    assert NODE is not None
    code, out, err = await run(
        NODE,
        "run_session.js",
        "--target",
        f"127.0.0.1:{harness.app.port}",
        "--token",
        TOKENS["loop"],
        "--model",
        MODEL,
        "--budget",
        "0.5",
        "--prompt",
        "[[sandbox:polyglot_loop]] look it up, then run it",
        "--caller-tool",
        json.dumps(tool),
        "--tool-result",
        "from Node:",
        "--require-approval",
        "Bash",
        "--permission",
        "allow",
    )

    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["state"] == "SESSION_STATE_COMPLETE" and summary["result"] == "Node answered."
    assert [(i["kind"], i["tool_name"]) for i in summary["inputs"]] == [
        ("INPUT_KIND_TOOL_CALL", "lookup"),
        ("INPUT_KIND_PERMISSION", "Bash"),
    ]
    assert summary["inputs"][0]["input"] == {"word": "papaya"}
    assert summary["inputs"][1]["input"]["command"] == BASH_COMMAND
    assert [(r["outcome"], r["decided_by"]) for r in summary["resolved"]] == [
        ("result", "DECIDER_CALLER"),
        ("allow", "DECIDER_CALLER"),
    ]
    assert sorted(r["outcome"] for r in summary["responded"]) == ["allow", "result"]
    # The model saw the Node caller's answer, and the output of the Bash it approved.
    seen = tool_results_seen(harness.sandbox, "polyglot_loop")
    text, is_error = seen[LOOKUP_ID]
    assert "from Node:" in text and '"papaya"' in text and not is_error
    text, is_error = seen[BASH_ID]
    assert BASH_OUTPUT in text and not is_error


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_gets_a_structured_result_and_downloads_an_artifact(
    harness: Harness, short_tmp: Path
) -> None:
    await node_modules()
    blob = random.Random(3).randbytes(150 * 1024)  # three chunks of 64 KiB at most
    (short_tmp / "in.bin").write_bytes(blob)
    harness.sandbox.add_script(
        "polyglot_files",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall(
                            "Bash",
                            {
                                "command": "mkdir -p out && cp data/in.bin out/copy.bin"
                                " && printf node > hi.txt"
                            },
                        )
                    ]
                ),
                Step(tool_calls=[ToolCall("StructuredOutput", {"answer": 5, "who": "node"})]),
                Step(text="done"),
            ]
        ),
    )
    schema = {
        "type": "object",
        "required": ["answer", "who"],
        "properties": {"answer": {"type": "integer"}, "who": {"type": "string"}},
    }

    assert NODE is not None
    code, out, err = await run(
        NODE,
        "run_session.js",
        "--target",
        f"127.0.0.1:{harness.app.port}",
        "--token",
        TOKENS["files"],
        "--model",
        MODEL,
        "--prompt",
        "[[sandbox:polyglot_files]] copy it and answer",
        "--output-schema",
        json.dumps(schema),
        "--input-file",
        f"data/in.bin={short_tmp / 'in.bin'}",
        "--download",
        "out/copy.bin",
        "--download",
        "hi.txt",
    )

    assert code == 0, (out, err)
    summary = json.loads(out)
    assert summary["state"] == "SESSION_STATE_COMPLETE"
    assert summary["structured_result"] == {"answer": 5, "who": "node"}
    digest = hashlib.sha256(blob).hexdigest()
    assert {a["path"]: (a["size_bytes"], a["sha256"]) for a in summary["artifacts"]} == {
        "out/copy.bin": (len(blob), digest),
        "hi.txt": (4, hashlib.sha256(b"node").hexdigest()),
    }
    copy = summary["downloads"]["out/copy.bin"]
    assert base64.b64decode(copy["base64"]) == blob and copy["sha256"] == digest
    assert copy["offsets"] == [0, 64 << 10, 128 << 10]
    assert copy["artifact"]["path"] == "out/copy.bin" and copy["artifact"]["sha256"] == digest
    assert base64.b64decode(summary["downloads"]["hi.txt"]["base64"]) == b"node"


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_with_a_bad_token_gets_unauthenticated(harness: Harness) -> None:
    await node_modules()
    assert NODE is not None

    code, out, _ = await run(
        NODE,
        "run_session.js",
        "--target",
        f"127.0.0.1:{harness.app.port}",
        "--token",
        "not-a-token",
        "--prompt",
        "hi",
    )

    summary = json.loads(out)
    assert code == 3 and summary["health"] == "SERVING"
    assert summary["error"]["code"] == "UNAUTHENTICATED" and summary["kinds"] == []


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_the_node_client_uses_the_python_clients_service_config() -> None:
    await node_modules()
    assert NODE is not None
    code, out, err = await run(NODE, "run_session.js", "--print-service-config")
    assert code == 0, err
    assert json.loads(out) == service_config()


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_rides_out_a_draining_replica(
    harness: Harness, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # grpc-js ignores healthCheckConfig: it keeps sending calls to a draining replica in
    # its round robin, and only the config's retries move them to the one that serves.
    await node_modules()
    assert NODE is not None
    harness.sandbox.add_script("node_drain", Script(steps=[Step(text="ok", usage=Usage(100, 5))]))
    draining = await start_harness(f"sqlite:///{short_tmp}/drain.db")
    draining.sandbox.add_script("hold", Script(steps=[Step(hang=True)]))
    held = draining.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:hold]] wait", model=MODEL),
        metadata=draining.auth(),
    )
    await held.read()  # admitted: the drain below waits for it
    stopping = asyncio.create_task(draining.app.stop(grace=60))
    try:
        for _ in range(100):
            if draining.app.health.problem is not None:
                break
            await asyncio.sleep(0.01)
        assert draining.app.health.problem == "the server is shutting down"
        caplog.set_level(logging.INFO, logger="agentplane.server.sessions.admission")
        target = f"ipv4:127.0.0.1:{draining.app.port},127.0.0.1:{harness.app.port}"
        # Its health check asks `liveness`: `readiness` of whichever replica answers the
        # Check (the draining one, by turns) would say NOT_SERVING.
        code, out, err = await run(
            NODE,
            "run_session.js",
            "--target",
            target,
            "--token",
            TOKENS["acme"],
            "--model",
            MODEL,
            "--sessions",
            "4",
            "--health-service",
            "liveness",
            "--prompt",
            "[[sandbox:node_drain]] hi",
        )
    finally:
        held.cancel()  # a disconnect: the session ends CANCELLED, and with it the drain
        await stopping
        await draining.channel.close()
        await draining.sandbox.stop()
        leftover = agent_processes(draining.work_dir)
        shutil.rmtree(draining.work_dir, ignore_errors=True)
    assert leftover == []

    assert code == 0, (out, err)
    summary = json.loads(out)
    assert [s["state"] for s in summary["sessions"]] == ["SESSION_STATE_COMPLETE"] * 4
    refused = [r for r in caplog.records if getattr(r, "reason", None) == "UNAVAILABLE"]
    assert refused, "no call reached the draining replica: the test proves nothing"


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
async def test_a_node_client_connects_over_mtls(database_url: str, short_tmp: Path) -> None:
    # The server speaks only TLS and wants a client certificate; `nodeco` is bound to the
    # certificate alone (no token).
    await node_modules()
    assert NODE is not None
    ca = CertificateAuthority()
    server_cert, server_key = ca.server().write(short_tmp, "server")
    client_cert, client_key = ca.issue("node", dns=("node.internal",)).write(short_tmp, "node")
    (short_tmp / "ca.crt").write_bytes(ca.pem)
    tls = await start_harness(
        database_url,
        tls_cert_file=server_cert,
        tls_key_file=server_key,
        tls_client_ca_file=short_tmp / "ca.crt",
        credentials=grpc.ssl_channel_credentials(
            ca.pem, client_key.read_bytes(), client_cert.read_bytes()
        ),
        extra_tenants=tenant_toml(
            "nodeco",
            anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
            allowed_tools=["Read"],
            client_cert_sans=["node.internal"],
        ),
    )
    try:
        tls.sandbox.add_script(
            "node_tls", Script(steps=[Step(text="hi over mTLS", usage=Usage(100, 5))])
        )
        target = ["--target", f"127.0.0.1:{tls.app.port}", "--model", MODEL]
        code, out, err = await run(
            NODE,
            "run_session.js",
            *target,
            "--ca-file",
            str(short_tmp / "ca.crt"),
            "--cert-file",
            str(client_cert),
            "--key-file",
            str(client_key),
            "--prompt",
            "[[sandbox:node_tls]] hi",
        )
        assert code == 0, (out, err)
        summary = json.loads(out)
        assert summary["tenant"] == "nodeco" and summary["result"] == "hi over mTLS"

        code, out, _ = await run(NODE, "run_session.js", *target, "--prompt", "hi")
        assert code == 3 and json.loads(out)["error"]["code"] == "UNAVAILABLE"  # plaintext
    finally:
        await stop_harness(tls)
