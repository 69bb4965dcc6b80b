"""What a session leaves behind, tried as a hostile tenant would: its artifacts never reach
past its workspace, and what it stores is bounded.

The agent is scripted (through the sandbox model) to run each attack as a `Bash` command:
symlinks planted for the server to follow when it collects the artifacts, and stream-json
lines forged into the CLI's own stdout (`/proc/<cli>/fd/1`, which the SDK reads).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy
from agentplane.server.model_double import Script, Step, ToolCall, Usage
from agentplane.server.sessions.run_request import InputFile
from agentplane.server.sessions.workspace.beneath import SymlinkInPath
from agentplane.server.sessions.workspace.files import write_input_files
from agentplane.v1 import session_pb2
from harness import TOKENS, Harness, short_dir, start_harness, stop_harness, tenant_toml

pytestmark = pytest.mark.asyncio
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the session sandbox needs root")

SECRET = "HOST-SECRET-5521"
TOKENS.update({"linker": "linker-token-1", "flooder": "flooder-token-2", "bulky": "bulky-token-3"})
MAX_EVENTS = 200
MAX_EVENTS_MIB = 1

# Run inside the sandbox: find the agent CLI (its first ancestor named claude), then write
# `count` forged stream-json `assistant` lines of about `size` bytes into its stdout,
# which the SDK in the server reads as the CLI's own messages. An agent running as an
# unprivileged uid cannot reopen that pipe (the server's, mode 0600): it prints REFUSED.
FORGE = r"""
import json, os, sys
count, size = int(sys.argv[1]), int(sys.argv[2])
pid = os.getppid()
while pid > 1:
    argv0 = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
    if argv0.endswith(b"claude"):
        break
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
try:
    out = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY)
except PermissionError:
    print("REFUSED", pid, flush=True)
    sys.exit(3)
print("cli", pid, flush=True)
for i in range(count):
    text = f"FORGED-{i}-" + "x" * size
    line = {"type": "assistant", "parent_tool_use_id": None, "session_id": "forged",
            "message": {"role": "assistant", "model": "claude-sonnet-4-5",
                        "content": [{"type": "text", "text": text}]}}
    os.write(out, (json.dumps(line) + "\n").encode())
print("forged", count, flush=True)
"""


@pytest.fixture(scope="module")
async def h(database_url: str) -> AsyncIterator[Harness]:
    key = "AGENTPLANE_TEST_ACME_KEY"
    tables = [
        tenant_toml("linker", TOKENS["linker"], anthropic_api_key_env=key, allowed_tools=["Bash"]),
        tenant_toml(
            "flooder",
            TOKENS["flooder"],
            anthropic_api_key_env=key,
            allowed_tools=["Bash"],
            max_events=MAX_EVENTS,
        ),
        tenant_toml(
            "bulky",
            TOKENS["bulky"],
            anthropic_api_key_env=key,
            allowed_tools=["Bash"],
            max_events_mib=MAX_EVENTS_MIB,
        ),
    ]
    harness = await start_harness(database_url, extra_tenants="\n".join(tables))
    yield harness
    await stop_harness(harness)


@pytest.fixture
def host_dir() -> Any:
    """A host folder holding a secret, outside every sandbox."""
    folder = short_dir("host")
    (folder / "secret.txt").write_text(f"{SECRET}\n")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def bash_session(h: Harness, tenant: str, name: str, command: str) -> list[Any]:
    """Run a session of `tenant` whose agent runs `command` once, then answers."""
    h.sandbox.add_script(
        name,
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Bash", {"command": command, "timeout": 120000})],
                    usage=Usage(input_tokens=100, output_tokens=10),
                ),
                Step(text="done", usage=Usage(input_tokens=120, output_tokens=5)),
            ]
        ),
    )
    return await h.run(tenant, prompt=f"[[sandbox:{name}]] go")


def tool_output(events: list[session_pb2.SessionEvent]) -> str:
    return "\n".join(e.tool_result.content for e in events if e.HasField("tool_result"))


async def listed(h: Harness, tenant: str, session_id: str) -> dict[str, Any]:
    reply = await h.sessions.ListArtifacts(
        session_pb2.ListArtifactsRequest(session_id=session_id), metadata=h.auth(tenant)
    )
    return {a.path: a for a in reply.artifacts}


async def content(h: Harness, tenant: str, session_id: str, path: str) -> bytes:
    call = h.sessions.GetArtifact(
        session_pb2.GetArtifactRequest(session_id=session_id, path=path), metadata=h.auth(tenant)
    )
    return b"".join([chunk.data async for chunk in call])


async def refused_download(h: Harness, tenant: str, session_id: str, path: str) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await content(h, tenant, session_id, path)
    return caught.value


@needs_root
async def test_a_workspace_replaced_by_a_symlink_to_a_host_folder_yields_no_artifact(
    h: Harness, host_dir: Path
) -> None:
    # The agent makes a file, then renames its workspace and puts a symlink to a host
    # folder in its place: collecting the artifacts must not walk into the host folder.
    command = (
        f'echo mine > mine.txt && cd .. && mv work work.real && ln -s "{host_dir}" work '
        "&& ls -la && echo swapped"
    )
    events = await bash_session(h, "linker", "swap-workspace", command)
    assert "swapped" in tool_output(events), tool_output(events)
    session_id = events[0].session_id
    found = await listed(h, "linker", session_id)
    assert list(found) == ["."], found
    assert found["."].omitted_reason.startswith("symlink"), found["."]
    assert "workspace" in found["."].omitted_reason
    err = await refused_download(h, "linker", session_id, "secret.txt")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert SECRET not in err.details()


@needs_root
async def test_symlinks_in_the_workspace_are_listed_as_left_out_and_never_read(
    h: Harness, host_dir: Path
) -> None:
    command = (
        f'ln -s "{host_dir}/secret.txt" leak.txt && ln -s "{host_dir}" leakdir '
        f'&& mkdir -p deep/er && ln -s "{host_dir}" deep/er/dir && echo kept > deep/er/ok.txt '
        "&& echo linked"
    )
    events = await bash_session(h, "linker", "inner-links", command)
    assert "linked" in tool_output(events), tool_output(events)
    session_id = events[0].session_id
    found = await listed(h, "linker", session_id)
    assert set(found) == {"leak.txt", "leakdir", "deep/er/dir", "deep/er/ok.txt"}, found
    for link in ("leak.txt", "leakdir", "deep/er/dir"):
        assert found[link].omitted_reason == "symlink", found[link]
        assert found[link].size_bytes == 0 and not found[link].sha256
        err = await refused_download(h, "linker", session_id, link)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "was not kept: symlink" in err.details() and SECRET not in err.details()
    assert await content(h, "linker", session_id, "deep/er/ok.txt") == b"kept\n"
    # Not a byte of the host file anywhere in the session's stored artifacts.
    async with h.app.engine.connect() as conn:
        rows = await conn.execute(
            sqlalchemy.text("SELECT path, content FROM session_artifacts WHERE session_id = :s"),
            {"s": session_id},
        )
        stored = [(path, bytes(data or b"")) for path, data in rows]
    assert stored and not [path for path, data in stored if SECRET.encode() in data]


async def test_input_files_never_follow_what_an_earlier_agent_left(short_tmp: Path) -> None:
    # An agent that ran in the folder before (a session folder reused) left symlinks, a
    # FIFO and a hard link where the request's input files go.
    host = short_tmp / "host"
    host.mkdir()
    (host / "victim.txt").write_text(SECRET)
    work = short_tmp / "w" / "t" / "s" / "work"
    work.mkdir(parents=True)
    (work / "linked.txt").symlink_to(host / "victim.txt")
    (work / "docs").symlink_to(host)
    os.mkfifo(work / "fifo.txt")
    os.link(host / "victim.txt", work / "hard.txt")

    files = [InputFile(p, b"input") for p in ("linked.txt", "fifo.txt", "hard.txt", "new/a.txt")]
    write_input_files(short_tmp / "w", work, files, None)
    for name in ("linked.txt", "fifo.txt", "hard.txt", "new/a.txt"):
        path = work / name
        assert path.is_file() and not path.is_symlink() and path.read_bytes() == b"input"
    assert (host / "victim.txt").read_text() == SECRET  # neither written through nor replaced

    with pytest.raises(SymlinkInPath):  # a folder of its path is a symlink: refused
        write_input_files(short_tmp / "w", work, [InputFile("docs/planted.txt", b"x")], None)
    assert sorted(p.name for p in host.iterdir()) == ["victim.txt"]

    (short_tmp / "w" / "t" / "s" / "work").rename(short_tmp / "w" / "t" / "s" / "real")
    (short_tmp / "w" / "t" / "s" / "work").symlink_to(host)
    with pytest.raises(SymlinkInPath) as caught:  # the workspace itself is one
        write_input_files(short_tmp / "w", work, [InputFile("planted.txt", b"x")], None)
    assert caught.value.errno == errno.ELOOP
    assert sorted(p.name for p in host.iterdir()) == ["victim.txt"]


async def stored_events(h: Harness, session_id: str) -> list[dict[str, Any]]:
    async with h.app.engine.connect() as conn:
        rows = await conn.execute(
            sqlalchemy.text(
                "SELECT seq, kind, payload FROM session_events WHERE session_id = :s ORDER BY seq"
            ),
            {"s": session_id},
        )
        return [
            {"seq": seq, "kind": kind, "payload": p if isinstance(p, dict) else json.loads(p)}
            for seq, kind, p in rows
        ]


async def replay(h: Harness, tenant: str, session_id: str) -> list[session_pb2.SessionEvent]:
    call = h.sessions.StreamSession(
        session_pb2.StreamSessionRequest(session_id=session_id), metadata=h.auth(tenant)
    )
    return [event async for event in call]


async def assert_ended_at_its_limit(
    h: Harness, tenant: str, events: list[session_pb2.SessionEvent], words: str
) -> list[dict[str, Any]]:
    """The session ended ERROR/EVENT_LIMIT (its message says `words`), and what it stored
    is readable: GetSession, and StreamSession's replay of every stored event."""
    session_id = events[0].session_id
    end = events[-1].result.session
    assert end.state == session_pb2.SESSION_STATE_ERROR, end
    assert end.error.reason == session_pb2.ERROR_REASON_EVENT_LIMIT, end.error
    assert words in end.error.message, end.error.message
    got = await h.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=session_id), metadata=h.auth(tenant)
    )
    assert got.error.reason == session_pb2.ERROR_REASON_EVENT_LIMIT
    stored = await stored_events(h, session_id)
    assert [e["seq"] for e in stored] == list(range(1, len(stored) + 1))  # no gap
    assert stored[-1]["kind"] == "result"
    replayed = await replay(h, tenant, session_id)
    assert [e.seq for e in replayed] == [e["seq"] for e in stored]
    assert replayed[-1].result.session.error.reason == session_pb2.ERROR_REASON_EVENT_LIMIT
    # What the caller saw live is what was stored.
    assert [e.seq for e in events if e.seq] == [e["seq"] for e in stored]
    return stored


def forge_refused(events: list[session_pb2.SessionEvent]) -> bool:
    """Whether the forging agent could not open its CLI's stdout (then: nothing forged
    was stored, and the session ended as its model said)."""
    if "REFUSED" not in tool_output(events):
        return False
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert not [e for e in events if "FORGED-" in e.assistant_text.text]
    return True


@needs_root
async def test_forged_cli_output_counts_against_the_session_event_limit(h: Harness) -> None:
    events = await bash_session(
        h, "flooder", "forge-many", f"python3 -c '{FORGE}' 5000 100 && sleep 60"
    )
    if forge_refused(events):
        return
    stored = await assert_ended_at_its_limit(h, "flooder", events, "max_events")
    assert len(stored) == MAX_EVENTS
    forged = [e for e in stored if "FORGED-" in json.dumps(e["payload"])]
    assert len(forged) > MAX_EVENTS // 2  # the forged lines were what filled it


@needs_root
async def test_forged_cli_output_counts_against_the_session_byte_limit(h: Harness) -> None:
    # 3 KiB lines (under the pipe's atomic 4 KiB): 4000 of them would be 12 MiB.
    events = await bash_session(
        h, "bulky", "forge-big", f"python3 -c '{FORGE}' 4000 3000 && sleep 60"
    )
    if forge_refused(events):
        return
    stored = await assert_ended_at_its_limit(h, "bulky", events, "max_events_mib")
    before_end = sum(len(json.dumps(e["payload"])) for e in stored[:-1])
    assert before_end <= MAX_EVENTS_MIB << 20
    assert before_end > (MAX_EVENTS_MIB << 20) - 8192  # it was the bytes that stopped it
    assert len(stored) < 20_000


# Forged `transcript_mirror` frames: the SDK hands them to the session store (the
# database), for any conversation path under the session's config folder.
FORGE_MIRROR = r"""
import json, os, sys, uuid
count, size = int(sys.argv[1]), int(sys.argv[2])
pid = os.getppid()
while pid > 1:
    argv0 = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
    if argv0.endswith(b"claude"):
        break
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
try:
    out = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY)
except PermissionError:
    print("REFUSED", pid, flush=True)
    sys.exit(3)
projects = os.environ["CLAUDE_CONFIG_DIR"] + "/projects/forged"
for i in range(count):
    entry = {"type": "user", "uuid": str(uuid.uuid4()), "text": "MIRRORED-" + "y" * size}
    frame = {"type": "transcript_mirror", "filePath": f"{projects}/{uuid.uuid4()}.jsonl",
             "entries": [entry]}
    os.write(out, (json.dumps(frame) + "\n").encode())
print("mirrored", count, flush=True)
"""


@needs_root
async def test_forged_transcript_frames_count_against_the_session_byte_limit(h: Harness) -> None:
    # Each frame names a new conversation: a limit per conversation would not hold them.
    events = await bash_session(
        h, "bulky", "forge-mirror", f"python3 -c '{FORGE_MIRROR}' 3000 3000 && sleep 60"
    )
    if forge_refused(events):
        return
    await assert_ended_at_its_limit(h, "bulky", events, "max_events_mib")
    async with h.app.engine.connect() as conn:
        rows = await conn.execute(
            sqlalchemy.text("SELECT entry FROM transcript_entries"),
        )
        forged = sum(
            len(e if isinstance(e, str) else json.dumps(e))
            for (e,) in rows
            if "MIRRORED-" in (e if isinstance(e, str) else json.dumps(e))
        )
    assert 0 < forged <= MAX_EVENTS_MIB << 20


# The same limits, reached the ordinary way: by what the model makes the agent do.


async def test_a_session_past_its_event_count_ends_event_limit(h: Harness) -> None:
    # One turn of 120 tool calls: each a tool_use and a tool_result event.
    calls = [ToolCall("Bash", {"command": f"echo call-{i}"}) for i in range(120)]
    h.sandbox.add_script("many-calls", Script(steps=[Step(tool_calls=calls), Step(text="done")]))
    events = await h.run("flooder", prompt="[[sandbox:many-calls]] go")
    stored = await assert_ended_at_its_limit(h, "flooder", events, "max_events")
    assert len(stored) == MAX_EVENTS


async def test_a_session_past_its_event_bytes_ends_event_limit(h: Harness) -> None:
    # Answers of 300 KiB each: the fourth passes 1 MiB (with the transcript, sooner).
    steps = [
        Step(tool_calls=[ToolCall("Bash", {"command": f"echo turn-{i}"})], text="z" * (300 << 10))
        for i in range(6)
    ]
    h.sandbox.add_script("big-answers", Script(steps=[*steps, Step(text="done")]))
    events = await h.run("bulky", prompt="[[sandbox:big-answers]] go")
    stored = await assert_ended_at_its_limit(h, "bulky", events, "max_events_mib")
    assert sum(len(json.dumps(e["payload"])) for e in stored[:-1]) <= MAX_EVENTS_MIB << 20
    assert len([e for e in stored if "z" * 1000 in json.dumps(e["payload"])]) < 4
