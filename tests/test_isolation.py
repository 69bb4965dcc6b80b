"""Tenant isolation on the host: agents of different tenants run as different Unix users
and cannot read each other's folders. Needs root (to create the users and run as them)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
from agentplane.server.model_double import Script, Step, ToolCall
from agentplane.v1 import session_pb2
from harness import Harness, start_harness, stop_harness, tenant_toml

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("useradd"), reason="needs root and useradd"
    ),
]

USERS = ("apiso_a", "apiso_b")


def ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


@pytest.fixture(scope="module", params=["bwrap", "none"])
async def isolated(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Two tenants with os_users, sandboxed (the default) or with AGENTPLANE_SANDBOX=none."""
    for name in USERS:
        ensure_user(name)
    tenants = "\n".join(
        tenant_toml(
            user,
            user,
            anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
            allowed_tools=["Bash"],
            os_user=user,
        )
        for user in USERS
    )
    h = await start_harness(database_url, extra_tenants=tenants, sandbox=request.param == "bwrap")
    h.work_dir.chmod(0o711)  # the test's own temp folder must be traversable too
    yield h
    await stop_harness(h)


async def test_an_agent_cannot_read_another_tenants_files(isolated: Harness) -> None:
    h = isolated
    root_b = h.app.settings.work_dir / "apiso_b"
    root_b.mkdir(mode=0o700, exist_ok=True)
    secret = root_b / "secret.txt"
    secret.write_text("B-SECRET-42\n")
    b = pwd.getpwnam("apiso_b")
    os.chown(root_b, b.pw_uid, b.pw_gid)
    os.chown(secret, b.pw_uid, b.pw_gid)
    secret.chmod(0o600)

    command = f"id -un; cat {secret}; ls {root_b}; echo mine > own.txt && cat own.txt"
    h.sandbox.add_script(
        "snoop",
        Script(
            steps=[Step(tool_calls=[ToolCall("Bash", {"command": command})]), Step(text="done")]
        ),
    )
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:snoop]] look", model="claude-sonnet-4-5"),
        metadata=(("authorization", "Bearer apiso_a"),),
    )
    events = [e async for e in call]
    output = next(e.tool_result.content for e in events if e.HasField("tool_result"))
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert output.splitlines()[0] == "apiso_a"  # the agent ran as tenant A's user
    if h.app.settings.sandbox:
        assert f"ls: cannot access '{root_b}': No such file or directory" in output  # not there
    else:
        assert "Permission denied" in output  # there, but another user's
    assert "B-SECRET-42" not in output
    assert "mine" in output  # while its own folder is writable
    root_a = h.app.settings.work_dir / "apiso_a"
    assert root_a.stat().st_mode & 0o777 == 0o700
    assert root_a.stat().st_uid == pwd.getpwnam("apiso_a").pw_uid


async def test_a_session_of_an_os_user_resumes_in_its_sandbox(isolated: Harness) -> None:
    h = isolated
    if not h.app.settings.sandbox:
        pytest.skip("unsandboxed, the SDK's resume folder is the server user's (docs/security.md)")
    memory = Script(
        steps=[
            Step(text="Noted: the fruit is FIG."),
            Step(text="You told me FIG."),
        ]
    )
    h.sandbox.add_script("osmemory", memory)
    auth = (("authorization", "Bearer apiso_a"),)
    first = [
        e
        async for e in h.sessions.RunSession(
            session_pb2.RunSessionRequest(
                prompt="[[sandbox:osmemory]] Remember the fruit FIG.", model="claude-sonnet-4-5"
            ),
            metadata=auth,
        )
    ]
    earlier = first[-1].result.session
    assert earlier.state == session_pb2.SESSION_STATE_COMPLETE, earlier.error
    events = [
        e
        async for e in h.sessions.RunSession(
            session_pb2.RunSessionRequest(
                prompt="Which fruit did I name?",
                model="claude-sonnet-4-5",
                resume_session_id=earlier.id,
            ),
            metadata=auth,
        )
    ]
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert final.result == "You told me FIG."
    history = str(h.sandbox.requests[-1].body["messages"])
    assert "Remember the fruit FIG" in history and "Which fruit did I name?" in history
