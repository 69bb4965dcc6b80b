"""Tenant API keys and caller tokens never reach the database, events or logs."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import grpc
import pytest
from agentplane.server.sandbox import Script, Step
from agentplane.server.sessions.launcher import BUNDLED_CLI
from agentplane.server.store.engine import sessionmaker
from agentplane.server.store.models import Base
from agentplane.v1 import session_pb2
from harness import MODEL, TOKENS, Harness, processes
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


async def test_an_agent_never_sees_a_tenants_key(harness: Harness) -> None:

    harness.sandbox.add_script("pause", Script(steps=[Step(text="ok", delay_s=2.0)]))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:pause]] hi", model=MODEL),
        metadata=harness.auth("globex"),
    )
    await call.read()
    for _ in range(100):
        agents = processes(harness.work_dir)
        if agents:
            break
        await asyncio.sleep(0.05)
    # The CLI itself (the launcher and bwrap before it run as the server, outside the
    # sandbox; the agent cannot see them).
    cli = [p for p in agents if p.cmdline.startswith(bytes(BUNDLED_CLI))]
    assert len(cli) == 1
    environ = cli[0].env
    # Not even its own key: the CLI holds a per-session gateway token instead.
    assert not [v for v in environ if b"sk-ant-test-" in v]
    assert [v for v in environ if v.startswith(b"ANTHROPIC_API_KEY=")] != []
    # None of the server's own variables reach it, blanked or not.
    assert not [v for v in environ if v.startswith(b"AGENTPLANE_TEST_")]
    while await call.read() is not grpc.aio.EOF:
        pass


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
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {
        f.name: 0o600 for f in files
    }
