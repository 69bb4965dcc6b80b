"""Operator mistakes get a clear answer: a busy port, a model API that cannot be reached, the
sandbox model's options, tenants without keys, a token from a pipe, an empty list."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from agentplane.cli import main as cli_main
from agentplane.v1 import session_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    MODEL,
    TOKENS,
    Harness,
    short_dir,
    start_harness,
    stop_harness,
    tenants_toml,
    write_tenants,
)
from test_server_process import free_port

SERVER = [sys.executable, "-m", "agentplane.server"]


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTPLANE_", "ANTHROPIC_"))}
    return {**env, **extra}


def test_a_busy_port_is_exit_2_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:  # as another server on the port would
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*SERVER, "serve"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=server_env(
                AGENTPLANE_LISTEN=f"127.0.0.1:{port}",
                AGENTPLANE_SANDBOX="none",
                AGENTPLANE_DATABASE_URL=f"sqlite:///{tmp_path}/a.db",
                AGENTPLANE_WORK_DIR=str(short_dir() / "w"),
            ),
        )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("agentplane-server: invalid configuration: AGENTPLANE_LISTEN")
    assert f"cannot bind 127.0.0.1:{port}: the port is in use" in last


async def test_a_second_server_cannot_share_a_port_with_a_first(harness: Harness) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [*SERVER, "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=server_env(
            AGENTPLANE_LISTEN=f"127.0.0.1:{harness.app.port}",
            AGENTPLANE_SANDBOX="none",
            AGENTPLANE_DATABASE_URL=harness.database_url,
            AGENTPLANE_WORK_DIR=str(short_dir() / "w"),
        ),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the port is in use" in done.stderr


async def test_an_unreachable_model_api_fails_the_session_fast_and_shows_in_health(
    database_url: str,
) -> None:
    port = free_port()  # nothing listens there
    h = await start_harness(
        database_url, anthropic_base_url=f"http://127.0.0.1:{port}", retry_attempts=2
    )
    try:
        events = [
            e
            async for e in h.sessions.RunSession(
                session_pb2.RunSessionRequest(prompt="hello", model=MODEL), metadata=h.auth()
            )
        ]
        final = events[-1].result.session
        assert final.state == session_pb2.SESSION_STATE_ERROR
        assert final.error.reason == session_pb2.ERROR_REASON_MODEL_API_ERROR
        assert f"127.0.0.1:{port}" in final.error.message, final.error.message
        api_retries = [
            e for e in events if e.HasField("system") and e.system.subtype == "api_retry"
        ]
        assert len(api_retries) <= 1, len(api_retries)  # the CLI did not retry for minutes
        health = health_pb2_grpc.HealthStub(h.channel)
        model_api = await health.Check(
            health_pb2.HealthCheckRequest(service="agentplane.model_api")
        )
        assert model_api.status == health_pb2.HealthCheckResponse.NOT_SERVING
        ready = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert ready.status == health_pb2.HealthCheckResponse.SERVING  # other replicas may reach it
    finally:
        await stop_harness(h)


def test_the_sandbox_model_takes_its_options() -> None:
    shown = subprocess.run(
        [*SERVER, "sandbox", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert shown.returncode == 0
    assert "--port" in shown.stdout and "--host" in shown.stdout and "--scripts" in shown.stdout
    port = free_port()
    proc = subprocess.Popen(
        [*SERVER, "sandbox", "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_check_config_names_tenants_without_a_key(tmp_path: Path) -> None:
    write_tenants(tmp_path, tenants_toml(tmp_path))
    done = subprocess.run(
        [*SERVER, "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=server_env(
            AGENTPLANE_TENANTS_FILE=str(tmp_path / "tenants.toml"),
            AGENTPLANE_TEST_ACME_KEY="sk-ant-test",
        ),
    )
    assert done.returncode == 0, done.stderr
    assert "configuration ok" in done.stdout
    assert (
        "tenant 'globex' has no Anthropic API key: the environment variable "
        "AGENTPLANE_TEST_GLOBEX_KEY is not set" in done.stdout
    )
    assert "tenant 'acme'" not in done.stdout


def test_hash_token_reads_a_pipe_quietly() -> None:
    done = subprocess.run(
        [*SERVER, "hash-token"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert done.stderr == ""
    from agentplane.server.tenants import hash_token

    assert done.stdout.strip() == hash_token("s3cret")


async def test_dev_with_a_tenants_file_needs_no_keys(tmp_path: Path) -> None:
    work = short_dir()
    write_tenants(work, tenants_toml(work))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *SERVER,
        "dev",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=server_env(
            AGENTPLANE_TENANTS_FILE=str(work / "tenants.toml"),
            AGENTPLANE_LISTEN=f"127.0.0.1:{port}",
            AGENTPLANE_WORK_DIR=str(work / "w"),
            AGENTPLANE_DATABASE_URL=f"sqlite:///{tmp_path}/d.db",
        ),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service="readiness"), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        code = await asyncio.to_thread(
            cli_main,
            [
                "--target",
                f"127.0.0.1:{port}",
                "--token",
                TOKENS["globex"],
                "run",
                "hello",
            ],
        )
        assert code == 0
    finally:
        proc.terminate()
        await proc.wait()


async def test_list_says_when_there_is_nothing(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(
        cli_main,
        [
            "--target",
            f"127.0.0.1:{harness.app.port}",
            "--token",
            TOKENS["small"],
            "list",
            "--state",
            "error",
        ],
    )
    assert code == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert "no sessions match these filters" in out.err


def test_the_first_install_says_what_it_does(tmp_path: Path) -> None:
    # `make run` on a new machine installs for a minute or two before the server starts:
    # each step announces itself, pip names each package, and a failed install still fails.
    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    plan = subprocess.run(
        ["make", "-n", f"VENV={venv}", f"{venv}/.installed"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    steps = [line for line in plan.splitlines() if line.startswith("echo ")]
    assert [s.split("]")[0] for s in steps[:3]] == ['echo "[1/3', 'echo "[2/3', 'echo "[3/3']
    assert "about 2 minutes" in steps[2]
    install = next(line for line in plan.splitlines() if "pip install --progress-bar off" in line)
    assert install.startswith("set -o pipefail;") and "Collecting" in install


def test_check_config_names_a_missing_mcp_secret_but_never_a_value(tmp_path: Path) -> None:
    from harness import tenant_toml

    write_tenants(
        tmp_path,
        tenant_toml("crmco", "crm-tok", allowed_tools=["mcp__crm"])
        + (
            '[tenants.crmco.mcp_servers.crm]\ntype = "http"\nurl = "https://crm.example/mcp"\n'
            'headers = { Authorization = { env = "AGENTPLANE_TEST_CRM_BEARER" } }\n'
        ),
    )
    env = server_env(
        AGENTPLANE_TENANTS_FILE=str(tmp_path / "tenants.toml"), ANTHROPIC_API_KEY="sk-ant-test"
    )
    done = subprocess.run(
        [*SERVER, "check-config"], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    assert (
        "warning: tenant 'crmco': MCP server crm: header Authorization: the environment "
        "variable AGENTPLANE_TEST_CRM_BEARER is not set"
    ) in done.stdout
    done = subprocess.run(
        [*SERVER, "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**env, "AGENTPLANE_TEST_CRM_BEARER": "crm-bearer-value"},
    )
    assert "crmco" not in done.stdout and "crm-bearer-value" not in done.stdout + done.stderr
