"""The `agentplane` CLI's files in, structured results, artifacts and deletion, against
the real server: in-process via main() and as a real process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import pytest
from agentplane.cli import main
from agentplane.server.model_double.script import Script, Step, ToolCall
from harness import MODEL, TOKENS, Harness

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
BLOB = random.Random(161).randbytes(100 * 1024)  # two chunks of GetArtifact


def target(h: Harness) -> str:
    return f"127.0.0.1:{h.app.port}"


async def cli(h: Harness, *argv: str, token: str = TOKENS["files"]) -> int:
    """main() in a thread (its blocking calls must not stall the server's event loop)."""
    return await asyncio.to_thread(main, ["--target", target(h), "--token", token, *argv])


def bash(command: str) -> Step:
    return Step(tool_calls=[ToolCall("Bash", {"command": command})])


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A schema file, a text file and a binary one, in `tmp_path`."""
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "notes.txt").write_text("from the CLI\n")
    (tmp_path / "blob.bin").write_bytes(BLOB)
    return tmp_path


def copy_and_answer(h: Harness, name: str) -> str:
    h.sandbox.add_script(
        name,
        Script(
            steps=[
                bash(
                    "mkdir -p out && cp blob.bin out/copy.bin && cp docs/notes.md notes.out"
                    " && head -c 1100000 /dev/zero > big.bin"
                ),
                Step(tool_calls=[ToolCall("StructuredOutput", {"answer": 42})]),
                Step(text="done"),
            ]
        ),
    )
    return f"[[sandbox:{name}]] copy and answer"


async def test_run_with_a_schema_and_files_then_artifacts_download_and_delete(
    harness: Harness,
    inputs: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prompt = copy_and_answer(harness, "cli_files")

    code = await cli(
        harness,
        "run",
        prompt,
        "--model",
        MODEL,
        "--schema",
        str(inputs / "schema.json"),
        "--file",
        f"{inputs / 'notes.txt'}:docs/notes.md",
        "--file",
        str(inputs / "blob.bin"),
    )

    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert json.loads(lines[-1]) == {"answer": 42} and lines[-1] == '{"answer":42}'
    assert lines[-2].startswith("COMPLETE  cost $")
    session_id = lines[-2].split("session ")[-1]

    assert await cli(harness, "get", session_id) == 0
    details = capsys.readouterr().out
    assert 'schema:      {"type":"object","properties":{"answer"' in details
    assert 'structured result:\n{\n  "answer": 42\n}' in details

    assert await cli(harness, "artifacts", session_id) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split("  ")[-1] for row in rows if "not kept" not in row] == [
        "notes.out",
        "out/copy.bin",
    ]
    copy_row = next(row for row in rows if row.endswith("out/copy.bin"))
    assert "100.0 KiB" in copy_row and hashlib.sha256(BLOB).hexdigest()[:12] in copy_row
    (big_row,) = [row for row in rows if "not kept" in row]
    assert "big.bin  (not kept: larger than" in big_row
    assert await cli(harness, "artifacts", session_id, "--json") == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {a["path"] for a in listed} == {"notes.out", "out/copy.bin", "big.bin"}

    out_dir = inputs / "downloads"
    out_dir.mkdir()
    assert (
        await cli(harness, "download", session_id, "out/copy.bin", "-o", str(out_dir / "c.bin"))
        == 0
    )
    assert capsys.readouterr().out == f"out/copy.bin -> {out_dir / 'c.bin'} ({len(BLOB)} bytes)\n"
    assert (out_dir / "c.bin").read_bytes() == BLOB
    assert await cli(harness, "download", session_id, "notes.out", "--output", str(out_dir)) == 0
    assert (out_dir / "notes.out").read_text() == "from the CLI\n"
    monkeypatch.chdir(out_dir)
    assert await cli(harness, "download", session_id, "out/copy.bin") == 0  # into the cwd
    assert (out_dir / "copy.bin").read_bytes() == BLOB
    capsys.readouterr()

    assert await cli(harness, "download", session_id, "big.bin") == 3
    err = capsys.readouterr().err
    assert err.startswith("agentplane: FAILED_PRECONDITION: ") and "not kept" in err
    assert not (out_dir / "big.bin").exists()
    assert (
        await cli(
            harness,
            "download",
            session_id,
            "out/copy.bin",
            "-o",
            str(out_dir / "no" / "such" / "dir"),
        )
        == 2
    )
    assert "cannot write" in capsys.readouterr().err

    assert await cli(harness, "delete", session_id) == 0
    assert capsys.readouterr().out == f"deleted {session_id}\n"
    for argv in (["get", session_id], ["artifacts", session_id], ["delete", session_id]):
        assert await cli(harness, *argv) == 3, argv
        assert capsys.readouterr().err.startswith("agentplane: NOT_FOUND: ")


async def test_a_result_that_misses_its_schema_exits_1(
    harness: Harness, inputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.sandbox.add_script("cli_prose", Script(steps=[Step(text="only prose")]))

    code = await cli(
        harness,
        "run",
        "[[sandbox:cli_prose]] go",
        "--model",
        MODEL,
        "--schema",
        str(inputs / "schema.json"),
    )

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[-1].startswith("ERROR  cost $")  # no JSON line after
    assert "failed: INVALID_OUTPUT: " in captured.err

    session_id = captured.out.splitlines()[-1].split("session ")[-1]
    assert await cli(harness, "artifacts", session_id) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "no artifacts\n"

    (inputs / "array.json").write_text('{"type": "array"}')
    assert (
        await cli(harness, "run", "hi", "--model", MODEL, "--schema", str(inputs / "array.json"))
        == 3
    )
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


async def test_unreadable_files_and_bad_arguments_exit_2(
    inputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (inputs / "broken.json").write_text("{not json")
    for argv, message in (
        (["run", "hi", "--schema", str(inputs / "missing.json")], "cannot read"),
        (["run", "hi", "--schema", str(inputs / "broken.json")], "is not JSON"),
        (["run", "hi", "--file", str(inputs / "missing.txt")], "cannot read"),
        (["run", "hi", "--file", ":remote.txt"], "expected LOCAL[:REMOTE]"),
        (["download", "some-id"], "usage: agentplane"),
        (["artifacts"], "usage: agentplane"),
        (["delete"], "usage: agentplane"),
    ):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


async def test_the_installed_command_runs_with_files_and_downloads_to_stdout(
    harness: Harness, inputs: Path
) -> None:
    prompt = copy_and_answer(harness, "cli_files_process")
    env = {**os.environ, "AGENTPLANE_TARGET": target(harness), "AGENTPLANE_TOKEN": TOKENS["files"]}
    script = Path(sys.executable).with_name("agentplane")  # the console script of the venv
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agentplane.cli"]

    async def run(*argv: str) -> tuple[int, bytes, str]:
        proc = await asyncio.create_subprocess_exec(
            *command,
            *argv,
            env=env,
            cwd=inputs,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out, err.decode()

    code, out, err = await run(
        "run",
        prompt,
        "--model",
        MODEL,
        "--schema",
        "schema.json",
        "--file",
        "notes.txt:docs/notes.md",
        "--file",
        "blob.bin",
    )
    assert code == 0, err
    *_, summary, result = out.decode().splitlines()
    assert json.loads(result) == {"answer": 42}
    session_id = summary.split("session ")[-1]

    code, out, err = await run("download", session_id, "out/copy.bin", "-o", "-")
    assert code == 0, err
    assert out == BLOB
    assert sorted(p.name for p in inputs.iterdir()) == ["blob.bin", "notes.txt", "schema.json"]
