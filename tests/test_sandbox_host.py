"""The server's side of the session sandbox: no silent downgrade at start, the explicit
opt-out, and sandboxes that die with their server (real server processes)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentplane.server.model_double import SandboxServer, Script, Step, ToolCall
from agentplane.server.sandbox.mounts import unmount
from agentplane.v1 import session_pb2, session_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import processes, short_dir, tenant_toml, write_tenants
from test_server_process import free_port, wait_serving

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the session sandbox needs root")

TOKEN = "host-test-token"


def server_env(work: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    tenants = write_tenants(
        work, tenant_toml("t", TOKEN, allowed_tools=["Bash"], anthropic_api_key_env="HOST_TEST_KEY")
    )
    return {
        **clean,
        "AGENTPLANE_TENANTS_FILE": str(tenants),
        "HOST_TEST_KEY": "sk-host",
        "AGENTPLANE_DATABASE_URL": f"sqlite:///{work}/db.sqlite",
        "AGENTPLANE_WORK_DIR": str(work / "w"),
        **env,
    }


def run_server(work: Path, *prefix: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "agentplane.server", "serve"],
        env=server_env(work, AGENTPLANE_LISTEN="127.0.0.1:0", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_bwrap_the_server_refuses_to_start_and_says_how_to_install_it() -> None:
    work = short_dir()
    tools = work / "bin"  # a PATH with the sandbox's other tools, but no bwrap
    tools.mkdir()
    for name in ("socat", "setpriv"):
        (tools / name).symlink_to(str(shutil.which(name)))
    proc = run_server(work, PATH=str(tools))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "AGENTPLANE_SANDBOX" in lines[0] and "bwrap not found" in lines[0]
    assert "apt-get install -y bubblewrap" in lines[0] and "AGENTPLANE_SANDBOX=none" in lines[0]


def test_a_uid_range_holding_a_user_of_the_host_is_refused_at_start() -> None:
    # nobody (65534) is on every host: its files and processes are not the agents' to take.
    work = short_dir()
    proc = run_server(work, AGENTPLANE_SANDBOX_UIDS="60000-70000")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "holds the host's user 'nobody'" in lines[0] and "AGENTPLANE_SANDBOX_UIDS" in lines[0]


def test_where_namespaces_cannot_be_made_the_server_refuses_to_start() -> None:
    # Root without CAP_SYS_ADMIN, as in a default container: no mounts, no namespaces.
    work = short_dir()
    proc = run_server(
        work, "setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "cannot sandbox sessions" in lines[0] and "AGENTPLANE_SANDBOX=none" in lines[0]


@pytest.fixture
async def model() -> AsyncIterator[SandboxServer]:
    sandbox = SandboxServer()
    await sandbox.start()
    yield sandbox
    await sandbox.stop()


async def health_of(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "sandbox_status"),
    [
        ("bwrap", health_pb2.HealthCheckResponse.SERVING),
        ("none", health_pb2.HealthCheckResponse.NOT_SERVING),
    ],
)
async def test_the_opt_out_is_logged_and_shown_by_health(mode: str, sandbox_status: int) -> None:
    work, port = short_dir(), free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentplane.server",
        "serve",
        env=server_env(work, AGENTPLANE_LISTEN=f"127.0.0.1:{port}", AGENTPLANE_SANDBOX=mode),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_serving(port)
        assert await health_of(port, "agentplane.sandbox") == sandbox_status
        assert await health_of(port, "") == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = await server.communicate()
    warned = b"AGENTPLANE_SANDBOX=none: agents run unsandboxed" in err
    assert warned == (mode == "none")


@pytest.mark.asyncio
async def test_a_killed_server_takes_its_sandboxes_with_it(model: SandboxServer) -> None:
    work, port = short_dir(), free_port()
    model.add_script(
        "linger",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall(
                            "Bash",
                            {
                                "command": "env -i setsid sleep 987611 & sleep 987612",
                                "timeout": 600000,
                            },
                        )
                    ]
                ),
                Step(text="never"),
            ]
        ),
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentplane.server",
        "serve",
        env=server_env(
            work, AGENTPLANE_LISTEN=f"127.0.0.1:{port}", ANTHROPIC_BASE_URL=model.base_url
        ),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_serving(port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = session_pb2_grpc.SessionServiceStub(channel).RunSession(
                session_pb2.RunSessionRequest(
                    prompt="[[sandbox:linger]] go", model="claude-sonnet-4-5"
                ),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
            async for event in call:
                if event.HasField("tool_use"):
                    break
            for _ in range(1200):  # the tool has started both sleeps
                if len(sleepers()) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(sleepers()) == 2
            server.kill()
            await server.wait()
            for _ in range(1200):
                if not sleepers():
                    break
                await asyncio.sleep(0.05)
            assert sleepers() == []
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
        # The dead server's session folder stays mounted until a server recovers it.
        for mount in [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(work))
        ]:
            unmount(Path(mount))


def sleepers() -> list[int]:
    return [p.pid for p in processes() if b"sleep\x0098761" in p.cmdline]
