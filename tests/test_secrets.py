"""Tenant API keys and caller tokens never reach the database, events or logs."""

from __future__ import annotations

import asyncio
import logging
import shutil
import stat
from pathlib import Path

import grpc
import pytest
from agentplane.server.model_double import Script, Step, ToolCall
from agentplane.server.sandbox.bwrap import CLI_INSIDE
from agentplane.server.sessions.agents.launcher import BUNDLED_CLI
from agentplane.server.store.engine import sessionmaker
from agentplane.server.store.models import Base
from agentplane.v1 import session_pb2
from harness import (
    MODEL,
    TOKENS,
    Harness,
    processes,
    short_dir,
    start_harness,
    stop_harness,
    tenant_toml,
)
from sqlalchemy import select
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.asyncio

SECRETS = ["sk-ant-test-acme-key", "sk-ant-test-globex-key", *TOKENS.values()]


async def test_no_secret_is_persisted_streamed_or_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    events = await harness.run(prompt="tell me a secret")
    assert events[-1].result.session.state  # the session ran and ended
    # The key did reach the model endpoint (so its absence elsewhere means something).
    assert any(
        r.headers.get("x-api-key") == "sk-ant-test-acme-key" for r in harness.sandbox.requests
    )

    dump = [str(e) for e in events]
    async with sessionmaker(harness.app.engine)() as db:
        for table in Base.metadata.sorted_tables:
            dump.extend(str(row) for row in (await db.execute(select(table))).all())
    # The message and every field given with it (structured logs carry their data in extras).
    dump.extend(f"{record.getMessage()} {vars(record)}" for record in caplog.records)
    text = "\n".join(dump)
    assert "tell me a secret" in text  # the scan does see the session's data
    for secret in SECRETS:
        assert secret not in text


async def cli_environ(h: Harness) -> list[bytes]:
    """The environment of a running session's CLI (globex's; the session is left to end)."""
    h.sandbox.add_script("pause", Script(steps=[Step(text="ok", delay_s=2.0)]))
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:pause]] hi", model=MODEL),
        metadata=h.auth("globex"),
    )
    await call.read()
    cli: list[bytes] = []
    for _ in range(1200):  # it runs at least 2 s once started; starting may take a while
        # The CLI itself (the launcher and bwrap before it run as the server, outside the
        # sandbox; the agent cannot see them).
        found = [
            p
            for p in processes(h.work_dir)
            if p.cmdline.split(b"\0")[0] in (bytes(BUNDLED_CLI), CLI_INSIDE.encode())
        ]
        if found:
            cli = found[0].env
            break
        await asyncio.sleep(0.05)
    while await call.read() is not grpc.aio.EOF:
        pass
    assert cli, "no CLI process was seen"
    return cli


async def test_an_agent_never_sees_a_tenants_key(harness: Harness) -> None:
    environ = await cli_environ(harness)
    # Not even its own key: the CLI holds a per-session gateway token instead.
    assert not [v for v in environ if b"sk-ant-test-" in v]
    assert [v for v in environ if v.startswith(b"ANTHROPIC_API_KEY=")] != []
    # None of the server's own variables reach it, blanked or not.
    assert not [v for v in environ if v.startswith(b"AGENTPLANE_TEST_")]


async def test_unsandboxed_agents_get_every_tenants_key_variable_blanked(database_url: str) -> None:
    h = await start_harness(database_url, sandbox=False)
    try:
        environ = await cli_environ(h)
    finally:
        await stop_harness(h)
    assert not [v for v in environ if b"sk-ant-test-" in v]
    assert b"AGENTPLANE_TEST_ACME_KEY=" in environ  # blanked, not inherited


async def test_the_sqlite_database_and_its_wal_are_private_to_the_server(
    harness: Harness,
) -> None:
    if not harness.database_url.startswith("sqlite:"):
        pytest.skip("a PostgreSQL database keeps its files to itself")
    events = await harness.run(prompt="hello")  # the WAL and its index exist once written
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    database = Path(make_url(harness.database_url).database or "")
    files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    assert all(f.exists() for f in files)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}


async def test_a_key_file_is_read_for_each_session_and_never_reaches_the_agent(
    database_url: str,
) -> None:
    folder = short_dir()
    key_file = folder / "filekey"
    key_file.write_text("sk-ant-from-file-1\n")
    key_file.chmod(0o600)
    h = await start_harness(
        database_url,
        extra_tenants=tenant_toml(
            "filed", "filed-token", anthropic_api_key_file=key_file, allowed_tools=["Bash"]
        ),
    )
    TOKENS["filed"] = "filed-token"
    try:
        h.sandbox.add_script(
            "env",
            Script(
                steps=[
                    Step(tool_calls=[ToolCall("Bash", {"command": f"env; cat {key_file}"})]),
                    Step(text="ok"),
                ]
            ),
        )
        first = await h.run("filed", prompt="[[sandbox:env]] go")
        key_file.write_text("sk-ant-from-file-2\n")  # rotated: the next session uses it
        second = await h.run("filed", prompt="[[sandbox:env]] go")
        keys = [r.headers.get("x-api-key") for r in h.sandbox.requests]
        assert "sk-ant-from-file-1" in keys and "sk-ant-from-file-2" in keys
        for events in (first, second):
            assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
            output = "\n".join(e.tool_result.content for e in events if e.HasField("tool_result"))
            assert "ANTHROPIC_API_KEY=" in output and "sk-ant-from-file" not in output
            assert "No such file or directory" in output  # the key file is not in its sandbox
    finally:
        TOKENS.pop("filed")
        await stop_harness(h)
        shutil.rmtree(folder, ignore_errors=True)
