"""The `agentplane` CLI against the real server: in-process via main() and as a real process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import select
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from agentplane.cli import main
from agentplane.server.model_double.script import HttpFailure, Script, Step, ToolCall, Usage
from agentplane.v1 import session_pb2
from harness import MODEL, TOKENS, Harness
from model_view import (
    ASK_ID,
    BASH_COMMAND,
    BASH_ID,
    BASH_OUTPUT,
    QUESTION,
    question_input,
    tool_results_seen,
)


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
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Grep", {"pattern": "magic", "output_mode": "content"})],
                    usage=Usage(1500, 60),
                ),
                Step(text="It is PAPAYA.\nSecond line.", usage=Usage(1800, 30)),
            ]
        ),
    )

    code = await cli(
        harness,
        "run",
        "[[sandbox:cli_grep]] magic word?",
        "--model",
        MODEL,
        "--budget",
        "0.5",
        "--max-turns",
        "4",
        "--tool",
        "Grep",
        "--tool",
        "Read",
        "--label",
        "via=cli",
        "--label",
        "n=1",
    )

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
    # The trace it ran in (the server traces even with no exporter: ids still flow).
    (trace_line,) = [line for line in details.splitlines() if line.startswith("trace id:")]
    assert re.fullmatch(r"trace id:    [0-9a-f]{32}", trace_line)

    assert await cli(harness, "get", session_id, "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["id"] == session_id and got["state"] == "SESSION_STATE_COMPLETE"

    assert await cli(harness, "list", "--label", "via=cli", "--state", "complete") == 0
    rows = capsys.readouterr().out.splitlines()
    assert (
        len(rows) == 1
        and rows[0].startswith(f"{session_id}  COMPLETE")
        and "n=1,via=cli" in rows[0]
    )
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
            *command,
            *argv,
            env={**env, **extra},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
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


# -- callers in the loop (issue 15): approvals and questions ---------------------------------


def bash_then_ask(name: str) -> Script:
    """Bash (the tests make it need approval), then the agent's question, then its answer."""
    return Script(
        steps=[
            Step(
                tool_calls=[ToolCall("Bash", {"command": BASH_COMMAND}, BASH_ID)],
                usage=Usage(1000, 30),
            ),
            Step(
                tool_calls=[ToolCall("AskUserQuestion", question_input(), ASK_ID)],
                usage=Usage(1100, 30),
            ),
            Step(text=f"{name} done", usage=Usage(1200, 10)),
        ]
    )


def agentplane_command() -> list[str]:
    script = Path(sys.executable).with_name("agentplane")  # the console script of the venv
    return [str(script)] if script.exists() else [sys.executable, "-m", "agentplane.cli"]


def event_lines(out: str, kind: str) -> list[str]:
    return [line for line in out.splitlines() if line.split()[1:2] == [kind]]


async def test_deny_all_denies_approvals_and_answers_questions_with_nothing(
    harness: Harness,
) -> None:
    harness.sandbox.add_script("cli_deny_all", bash_then_ask("deny-all"))
    env = {**os.environ, "AGENTPLANE_TARGET": target(harness), "AGENTPLANE_TOKEN": TOKENS["loop"]}

    proc = await asyncio.create_subprocess_exec(
        *agentplane_command(),
        "run",
        "[[sandbox:cli_deny_all]] run and ask",
        "--model",
        MODEL,
        "--require-approval",
        "Bash",
        "--answer-timeout",
        "120",
        "--deny-all",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    raw_out, raw_err = await asyncio.wait_for(proc.communicate(), 60)
    out, err = raw_out.decode(), raw_err.decode()

    assert proc.returncode == 0, (out, err)
    assert out.splitlines()[-1].startswith("COMPLETE  cost $")
    asked = event_lines(out, "input_request")
    assert len(asked) == 2
    assert f'PERMISSION Bash {{"command":"{BASH_COMMAND}"' in asked[0]
    assert "(answer by " in asked[0]
    assert f"QUESTION AskUserQuestion {QUESTION} [Papaya | Mango]" in asked[1]
    resolved = event_lines(out, "input_resolved")
    assert "PERMISSION deny by CALLER: denied by agentplane run --deny-all" in resolved[0]
    assert "QUESTION" in resolved[1] and "by CALLER" in resolved[1]
    assert "denied Bash: denied by agentplane run --deny-all" in err
    seen = tool_results_seen(harness.sandbox, "cli_deny_all")
    assert "--deny-all" in seen[BASH_ID][0] and BASH_OUTPUT not in seen[BASH_ID][0]
    assert "Papaya" not in seen[ASK_ID][0] and "Mango" not in seen[ASK_ID][0]


async def test_without_a_terminal_approvals_are_denied_without_reading_stdin(
    harness: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness.sandbox.add_script("cli_no_tty", bash_then_ask("no-tty"))
    piped = io.StringIO("y\n2\n")  # not a terminal: never read
    monkeypatch.setattr(sys, "stdin", piped)

    code = await cli(
        harness,
        "run",
        "[[sandbox:cli_no_tty]] run it",
        "--model",
        MODEL,
        "--require-approval",
        "Bash",
        token=TOKENS["loop"],
    )

    captured = capsys.readouterr()
    assert code == 0, captured
    assert piped.tell() == 0
    (resolved, _) = event_lines(captured.out, "input_resolved")
    assert "PERMISSION deny by CALLER: stdin is not a terminal" in resolved
    assert "denied Bash: stdin is not a terminal" in captured.err
    seen = tool_results_seen(harness.sandbox, "cli_no_tty")
    assert "stdin is not a terminal" in seen[BASH_ID][0]


def converse(fd: int, exchanges: list[tuple[str, str]], limit_s: float = 60) -> str:
    """Read the terminal `fd` until each prompt appears, then type its reply; everything
    read (a safety limit ends a conversation whose prompt never comes)."""
    seen = b""
    deadline = time.monotonic() + limit_s
    for prompt, reply in exchanges:
        while prompt.encode() not in seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                return seen.decode(errors="replace")
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the process closed the terminal
                return seen.decode(errors="replace")
            seen += chunk
        seen = seen.replace(prompt.encode(), b"<" + prompt.strip().encode() + b">", 1)
        os.write(fd, reply.encode() + b"\n")
    return seen.decode(errors="replace")


async def test_at_a_terminal_the_person_approves_and_answers(harness: Harness) -> None:
    harness.sandbox.add_script("cli_tty", bash_then_ask("tty"))
    env = {**os.environ, "AGENTPLANE_TARGET": target(harness), "AGENTPLANE_TOKEN": TOKENS["loop"]}
    controller, terminal = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *agentplane_command(),
            "run",
            "[[sandbox:cli_tty]] run and ask",
            "--model",
            MODEL,
            "--require-approval",
            "Bash",
            env=env,
            stdin=terminal,
            stdout=asyncio.subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        terminal = -1
        stdout = asyncio.ensure_future(proc.stdout.read())  # type: ignore[union-attr]
        shown = await asyncio.to_thread(
            converse,
            controller,
            [
                ("Allow Bash? [y/n] ", "y"),
                ("Answer (a number, or your own answer; Enter to skip): ", "2"),
            ],
        )
        out = (await asyncio.wait_for(stdout, 60)).decode()
        code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)

    assert code == 0, (out, shown)
    assert "The agent wants to run Bash:" in shown and f"    command: {BASH_COMMAND}" in shown
    assert "<Allow Bash? [y/n]>" in shown
    assert f"The agent asks: [Fruit] {QUESTION}" in shown and "2. Mango - another fruit" in shown
    assert "<Answer (a number, or your own answer; Enter to skip):>" in shown
    resolved = event_lines(out, "input_resolved")
    assert "PERMISSION allow by CALLER" in resolved[0]
    assert "QUESTION answered by CALLER" in resolved[1]
    assert out.splitlines()[-1].startswith("COMPLETE  cost $")
    seen = tool_results_seen(harness.sandbox, "cli_tty")
    assert BASH_OUTPUT in seen[BASH_ID][0]  # approved: Bash ran
    assert "Mango" in seen[ASK_ID][0]


async def test_respond_answers_a_waiting_session_by_hand(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.sandbox.add_script("cli_respond", bash_then_ask("respond"))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(
            prompt="[[sandbox:cli_respond]] run and ask",
            model=MODEL,
            require_approval=["Bash"],
        ),
        metadata=harness.auth("loop"),
    )
    answered = []
    events = []
    async for event in call:  # nobody answers on this stream: the CLI does, by hand
        events.append(event)
        if not event.HasField("input_request"):
            continue
        request = event.input_request
        assert await cli(harness, "list", "--awaiting", token=TOKENS["loop"]) == 0
        listed = capsys.readouterr().out
        assert await cli(harness, "get", event.session_id, token=TOKENS["loop"]) == 0
        details = capsys.readouterr().out
        if request.kind == session_pb2.INPUT_KIND_PERMISSION:
            argv = ["--deny", "use Python instead"]
        else:
            argv = ["--answer", f"{QUESTION}=Mango"]
        code = await cli(
            harness, "respond", event.session_id, request.request_id, *argv, token=TOKENS["loop"]
        )
        answered.append((code, capsys.readouterr().out.strip(), listed, details))

    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    (deny_code, denied, listed, details), (answer_code, answer, _, _) = answered
    assert (deny_code, answer_code) == (0, 0)
    assert events[0].session_id in listed
    assert "awaiting:    PERMISSION Bash (" in details
    assert denied == "PERMISSION deny by CALLER: use Python instead"
    assert answer == "QUESTION answered by CALLER"
    seen = tool_results_seen(harness.sandbox, "cli_respond")
    assert "use Python instead" in seen[BASH_ID][0] and "Mango" in seen[ASK_ID][0]

    # Too late now: the session has ended.
    code = await cli(
        harness,
        "respond",
        events[0].session_id,
        request.request_id,
        "--allow",
        token=TOKENS["loop"],
    )
    assert code == 3 and "FAILED_PRECONDITION" in capsys.readouterr().err
    assert main(["respond", "s", "r"]) == 2  # an answer is required
    assert main(["respond", "s", "r", "--allow", "--deny"]) == 2
    capsys.readouterr()
