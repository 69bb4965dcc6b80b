"""The `agentplane` CLI against the real server: in-process via main() and as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from agentplane.cli import main
from agentplane.server.sandbox.script import HttpFailure, Script, Step, ToolCall, Usage
from harness import MODEL, TOKENS, Harness


def target(h: Harness) -> str:
    return f"127.0.0.1:{h.app.port}"


async def cli(h: Harness, *argv: str, token: str | None = TOKENS["acme"]) -> int:
    """main() in a thread (its blocking calls must not stall the server's event loop)."""
    args = ["--target", target(h), *(["--token", token] if token else []), *argv]
    return await asyncio.to_thread(main, args)


async def test_run_streams_readable_events_and_a_summary(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.sandbox.add_script(
        "cli_grep",
        Script(steps=[
            Step(tool_calls=[ToolCall("Grep", {"pattern": "magic", "output_mode": "content"})],
                 usage=Usage(1500, 60)),
            Step(text="It is PAPAYA.\nSecond line.", usage=Usage(1800, 30)),
        ]),
    )

    code = await cli(harness, "run", "[[sandbox:cli_grep]] magic word?", "--model", MODEL,
                     "--budget", "0.5", "--max-turns", "4", "--tool", "Grep", "--tool", "Read",
                     "--label", "via=cli", "--label", "n=1")

    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["1", "started"]
    assert lines[1].split()[1:] == ["state_change", "IDLE", "->", "RUNNING"]
    tool_use = next(line for line in lines if " tool_use " in line)
    assert 'Grep {"' in tool_use and '"pattern":"magic"' in tool_use  # compact JSON
    assert any(" tool_result " in line and "PAPAYA" in line for line in lines)
    text_at = next(i for i, line in enumerate(lines) if "assistant_text" in line)
    assert lines[text_at].endswith("It is PAPAYA.") and lines[text_at + 1].strip() == "Second line."
    summary = lines[-1]
    assert summary.startswith("COMPLETE  cost $") and "turns 2" in summary
    assert "tokens 3300 in/90 out" in summary
    session_id = summary.split("session ")[-1]
    uuid.UUID(session_id)

    assert await cli(harness, "get", session_id) == 0
    details = capsys.readouterr().out
    assert f"id:          {session_id}" in details and "state:       COMPLETE" in details
    assert "labels:      n=1, via=cli" in details and details.rstrip().endswith("Second line.")

    assert await cli(harness, "get", session_id, "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["id"] == session_id and got["state"] == "SESSION_STATE_COMPLETE"

    assert await cli(harness, "list", "--label", "via=cli", "--state", "complete") == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 1 and rows[0].startswith(f"{session_id}  COMPLETE") and "n=1,via=cli" in rows[0]
    assert await cli(harness, "list", "--limit", "1", "--json") == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


async def test_run_json_prints_one_event_per_line(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await cli(harness, "run", "say hi", "--model", MODEL, "--json", token=TOKENS["globex"])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    events = [json.loads(line) for line in lines]
    assert "started" in events[0] and "result" in events[-1]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["result"]["session"]["state"] == "SESSION_STATE_COMPLETE"


async def test_a_session_that_ends_in_error_exits_1(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.sandbox.add_script(
        "cli_500", Script(steps=[Step(fail_always=HttpFailure(500, should_retry=False))])
    )

    code = await cli(harness, "run", "[[sandbox:cli_500]] hi", "--model", MODEL)

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[-1].startswith("ERROR  cost $")
    assert "failed: MODEL_API_ERROR: " in captured.err and "500" in captured.err


async def test_budget_health_and_rpc_errors(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli(harness, "budget", token=TOKENS["globex"]) == 0
    out = capsys.readouterr().out
    assert "tenant:      globex" in out and "limit:       $10" in out
    assert await cli(harness, "budget", "--date", "2020-01-01", "--json") == 0
    budget = json.loads(capsys.readouterr().out)
    assert budget["date"] == "2020-01-01" and Decimal(budget["spent_usd"]) == 0

    assert await cli(harness, "health") == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert await cli(harness, "health", "--service", "no.such.Service") == 3
    assert capsys.readouterr().err.startswith("agentplane: NOT_FOUND")

    assert await cli(harness, "budget", token="wrong") == 3
    err = capsys.readouterr().err
    assert err.startswith("agentplane: UNAUTHENTICATED: ") and err.count("\n") == 1
    assert await cli(harness, "get", str(uuid.uuid4())) == 3
    assert capsys.readouterr().err.startswith("agentplane: NOT_FOUND: ")
    assert await cli(harness, "run", "   ", "--budget", "0.1") == 3
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


async def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["run"],
        ["run", "hi", "--budget", "lots"],
        ["run", "hi", "--label", "novalue"],
        ["list", "--state", "done"],
        ["budget", "--date", "yesterday"],
        ["--timeout", "-1", "health"],
        ["frobnicate"],
    ):
        assert main(argv) == 2, argv
        assert "usage: agentplane" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "health" in capsys.readouterr().out


async def test_the_installed_command_runs_a_session_and_reports_rpc_errors(
    harness: Harness,
) -> None:
    env = {**os.environ, "AGENTPLANE_TARGET": target(harness), "AGENTPLANE_TOKEN": TOKENS["acme"]}

    script = Path(sys.executable).with_name("agentplane")  # the console script of the venv
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agentplane.cli"]

    async def run(*argv: str, **extra: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *command, *argv, env={**env, **extra},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run("run", "say hi from a process", "--model", MODEL)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("COMPLETE  cost $"), out

    code, out, err = await run("list", "--limit", "1", AGENTPLANE_TOKEN="not-a-token")
    assert code == 3 and out == ""
    assert err.startswith("agentplane: UNAUTHENTICATED: ")
