"""Operator mistakes get a clear answer: a busy port, a model API that cannot be reached, the
sandbox model's options, tenants without keys, a token from a pipe, an empty list."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentplane.cli import main as cli_main
from agentplane.v1 import session_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    MODEL,
    TEST_PG_URL,
    TOKENS,
    Harness,
    PostgresDatabase,
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
        [*SERVER, "model-double", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert shown.returncode == 0
    assert "--port" in shown.stdout and "--host" in shown.stdout and "--scripts" in shown.stdout
    port = free_port()
    proc = subprocess.Popen(
        [*SERVER, "model-double", "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_old_sandbox_command_still_starts_the_model_double_and_says_it_is_deprecated() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*SERVER, "sandbox", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
        note = proc.stderr.readline()
        assert "deprecated" in note and "agentplane-server model-double" in note
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
        # Ready, it says what to type next: the client beside it, this address, a token.
        assert proc.stdout is not None
        hint = ""
        while not hint.startswith("next:"):
            hint = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert hint, "dev's stdout ended without saying what to type next"
        assert hint.startswith("next: in another terminal: "), hint
        client, _, options = hint.strip().removeprefix("next: in another terminal: ").partition(" ")
        found = shutil.which(client)  # by PATH, or a path from the current folder
        assert found is not None, hint
        assert Path(found).resolve() == (Path(sys.executable).parent / "agentplane").resolve()
        assert options == (
            f'--target 127.0.0.1:{port} --token <a caller token of the tenants file> run "hello"'
        )
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


# -- each operator mistake: exit 2, one line saying what to do, no traceback ---------------


def run_server(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVER, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def the_one_line(done: subprocess.CompletedProcess[str], *, alone: bool = False) -> str:
    """The error line of a command that stopped on an operator mistake: exit 2, no
    traceback, one line that is not a log record (`alone`: nothing else on stderr)."""
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("{")]  # log records are JSON
    assert len(errors) == 1, done.stderr[-2000:]
    if alone:
        assert lines == errors, done.stderr[-2000:]
    assert errors[0].startswith("agentplane-server: "), errors[0]
    return errors[0]


def missing_pg_database() -> str:
    """A URL of a database that does not exist on the test PostgreSQL server."""
    from sqlalchemy.engine import make_url

    if not TEST_PG_URL:
        pytest.skip("needs AGENTPLANE_TEST_DATABASE_URL (PostgreSQL)")
    url = make_url(TEST_PG_URL).set(database=f"ap_missing_{uuid.uuid4().hex[:8]}")
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3"])
def test_serve_refuses_to_listen_beyond_loopback_without_a_tenants_file(
    host: str, tmp_path: Path
) -> None:
    done = run_server(
        "serve",
        env=server_env(
            AGENTPLANE_LISTEN=f"{host}:{free_port()}",
            AGENTPLANE_DATABASE_URL=f"sqlite:///{tmp_path}/a.db",
            AGENTPLANE_WORK_DIR=str(short_dir() / "w"),
        ),
    )
    line = the_one_line(done, alone=True)
    assert line.startswith(
        "agentplane-server: invalid configuration: AGENTPLANE_TENANTS_FILE: unset, so every "
        "caller would be served without auth (dev mode)"
    ), line
    assert f"AGENTPLANE_LISTEN={host}:" in line
    for remedy in (
        "set AGENTPLANE_TENANTS_FILE",
        "127.0.0.1",
        "AGENTPLANE_ALLOW_UNAUTHENTICATED=1",
    ):
        assert remedy in line
    assert not (tmp_path / "a.db").exists()  # nothing was opened


def test_the_images_defaults_refuse_to_serve_unauthenticated(tmp_path: Path) -> None:
    # deploy/Dockerfile's ENV, as shipped (on a free port, in case it did start).
    dockerfile = (Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile").read_text()
    block = dockerfile[dockerfile.index("\nENV ") + 5 :].split("\n\n")[0].split("\nRUN")[0]
    image = dict(pair.split("=", 1) for pair in block.replace("\\\n", " ").split() if "=" in pair)
    assert image["AGENTPLANE_LISTEN"].startswith("0.0.0.0:")
    assert (
        "AGENTPLANE_TENANTS_FILE" not in image and "AGENTPLANE_ALLOW_UNAUTHENTICATED" not in image
    )
    image["AGENTPLANE_LISTEN"] = f"0.0.0.0:{free_port()}"
    env = server_env(**image, AGENTPLANE_DATABASE_URL=f"sqlite:///{tmp_path}/a.db")
    for command in ("serve", "check-config"):  # check-config says what serve would refuse
        assert "AGENTPLANE_TENANTS_FILE: unset" in the_one_line(
            run_server(command, env=env), alone=True
        )


async def test_the_opt_in_serves_beyond_loopback_and_warns_at_every_start(
    tmp_path: Path,
) -> None:
    # The explicit opt-in starts it, loudly; a misspelled variable is named at start too.
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *SERVER,
        "serve",
        stderr=asyncio.subprocess.PIPE,
        env=server_env(
            AGENTPLANE_LISTEN=f"0.0.0.0:{port}",
            AGENTPLANE_ALLOW_UNAUTHENTICATED="1",
            AGENTPLANE_LISTENN="127.0.0.1:1",
            AGENTPLANE_SANDBOX="none",
            AGENTPLANE_DATABASE_URL=f"sqlite:///{tmp_path}/a.db",
            AGENTPLANE_WORK_DIR=str(short_dir() / "w"),
        ),
    )
    assert proc.stderr is not None
    records = []
    try:
        async with asyncio.timeout(120):
            while not any("agentplane listening" in r["event"] for r in records):
                line = await proc.stderr.readline()
                assert line, f"the server exited: {records}"
                records.append(json.loads(line))
    finally:
        proc.terminate()
        await proc.wait()
    warnings = [r["event"] for r in records if r["level"] == "WARNING"]
    assert (
        "AGENTPLANE_LISTENN is not an agentplane setting (ignored); did you mean AGENTPLANE_LISTEN?"
    ) in warnings
    loud = [w for w in warnings if w.startswith("AGENTPLANE_ALLOW_UNAUTHENTICATED=1")]
    assert len(loud) == 1 and f"0.0.0.0:{port}" in loud[0] and "ANYONE" in loud[0], warnings


def test_a_busy_prometheus_port_is_exit_2_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_server(
            "serve",
            env=server_env(
                AGENTPLANE_LISTEN=f"127.0.0.1:{free_port()}",
                AGENTPLANE_PROMETHEUS_PORT=str(port),
                AGENTPLANE_SANDBOX="none",
                AGENTPLANE_DATABASE_URL=f"sqlite:///{tmp_path}/a.db",
                AGENTPLANE_WORK_DIR=str(short_dir() / "w"),
            ),
        )
    line = the_one_line(done)
    assert line.startswith(
        "agentplane-server: invalid configuration: AGENTPLANE_PROMETHEUS_PORT: "
        f"cannot bind 127.0.0.1:{port} (Address already in use) for /metrics"
    ), line
    assert "choose a free port, or unset it" in line


def test_migrate_on_a_missing_postgresql_database_is_one_line() -> None:
    url = missing_pg_database()
    name = url.rsplit("/", 1)[1]
    done = run_server("migrate", env=server_env(AGENTPLANE_DATABASE_URL=url))
    line = the_one_line(done, alone=True)
    assert line.startswith(
        "agentplane-server: invalid configuration: AGENTPLANE_DATABASE_URL: cannot migrate "
    ), line
    assert f'database "{name}" does not exist; create it (`createdb ' in line, line


def test_migrate_with_no_database_server_is_one_line_without_the_password() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://ap:s3cret-pw@127.0.0.1:{port}/agentplane"
    done = run_server("migrate", env=server_env(AGENTPLANE_DATABASE_URL=url))
    line = the_one_line(done, alone=True)
    assert line.startswith(
        "agentplane-server: invalid configuration: AGENTPLANE_DATABASE_URL: cannot migrate "
        f"postgresql://ap:***@127.0.0.1:{port}/agentplane: "
    ), line
    assert line.endswith(
        "Connection refused; start the database server, or set AGENTPLANE_DATABASE_URL to "
        "where it runs"
    ), line
    assert "s3cret-pw" not in done.stdout + done.stderr


def test_migrate_into_a_missing_folder_is_one_line() -> None:
    done = run_server(
        "migrate", env=server_env(AGENTPLANE_DATABASE_URL="sqlite:////no/such/folder/a.db")
    )
    line = the_one_line(done, alone=True)
    assert "cannot migrate sqlite:////no/such/folder/a.db: unable to open database file" in line
    assert "the folder of /no/such/folder/a.db must exist and be writable" in line


def check_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """check-config on a database of its own in tmp_path, unless `env` names one."""
    defaults = {"AGENTPLANE_DATABASE_URL": f"sqlite:///{tmp_path}/a.db"}
    return run_server("check-config", env=server_env(**{**defaults, **env}), timeout=60)


def test_check_config_finds_a_database_it_cannot_reach(tmp_path: Path) -> None:
    line = the_one_line(
        check_config(tmp_path, AGENTPLANE_DATABASE_URL="sqlite:////no/such/folder/a.db"),
        alone=True,
    )
    assert line == (
        "agentplane-server: invalid configuration: AGENTPLANE_DATABASE_URL: "
        "/no/such/folder/a.db: the folder /no/such/folder does not exist; create it"
    )
    if TEST_PG_URL:
        url = missing_pg_database()
        line = the_one_line(check_config(tmp_path, AGENTPLANE_DATABASE_URL=url), alone=True)
        assert "AGENTPLANE_DATABASE_URL: cannot connect to postgresql://" in line
        assert "does not exist; create it (`createdb " in line


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of its own that is there and empty (SQLite: an empty file)."""
    if request.param == "sqlite":
        (tmp_path / "empty.db").touch()
        yield f"sqlite:///{tmp_path}/empty.db"
        return
    if not TEST_PG_URL:
        pytest.skip("needs AGENTPLANE_TEST_DATABASE_URL (PostgreSQL)")
    db = PostgresDatabase(TEST_PG_URL)
    yield db.create()
    db.drop()


def test_check_config_finds_a_database_not_migrated(tmp_path: Path, empty_database: str) -> None:
    # One that serve would not migrate (AGENTPLANE_AUTO_MIGRATE=0).
    env = {"AGENTPLANE_DATABASE_URL": empty_database, "AGENTPLANE_AUTO_MIGRATE": "0"}
    line = the_one_line(check_config(tmp_path, **env), alone=True)
    assert " was never migrated (the newest migration is " in line, line
    assert line.endswith("run `agentplane-server migrate` (or set AGENTPLANE_AUTO_MIGRATE=1)")
    # Serve would migrate it at start: fine. Then, migrated: at the newest.
    done = check_config(tmp_path, **{**env, "AGENTPLANE_AUTO_MIGRATE": "1"})
    assert done.returncode == 0, done.stderr
    assert "was never migrated; serve migrates it to" in done.stdout
    assert run_server("migrate", env=server_env(**env)).returncode == 0
    done = check_config(tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert "at the newest migration" in done.stdout, done.stdout


def test_check_config_finds_the_sandbox_tools_missing(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    line = the_one_line(check_config(tmp_path, PATH=str(empty)), alone=True)
    assert line == (
        "agentplane-server: invalid configuration: AGENTPLANE_SANDBOX: cannot sandbox "
        "sessions: bwrap and socat and setpriv not found on PATH (as root: apt-get install -y "
        "bubblewrap socat); or set AGENTPLANE_SANDBOX=none to run agents unsandboxed (unsafe "
        "with more than one tenant)"
    )
    done = check_config(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "sandbox: bwrap /" in done.stdout


def test_check_config_warns_of_likely_mistakes(tmp_path: Path) -> None:
    from harness import tenant_toml

    write_tenants(
        tmp_path,
        tenant_toml(
            "acme",
            "acme-tok",
            anthropic_api_key_env="AGENTPLANE_ACME_KEY",
            allowed_tools=["Read", "Globb", "Frobnicate", "mcp__crm"],
            daily_limit_usd="5",
        )
        + '[tenants.acme.mcp_servers.crm]\ntype = "http"\nurl = "https://crm.example/mcp"\n',
    )
    done = check_config(
        tmp_path,
        AGENTPLANE_TENANTS_FILE=str(tmp_path / "tenants.toml"),
        AGENTPLANE_ACME_KEY="sk-ant-test",  # named by the tenants file: known
        AGENTPLANE_LISTENN="0.0.0.0:1",
        AGENTPLANE_TOKEN="client-token",  # the client's
        AGENTPLANE_TEST_WHATEVER="1",  # the tests'
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings[:2] == [
        (
            "warning: AGENTPLANE_LISTENN is not an agentplane setting (ignored); did you mean "
            "AGENTPLANE_LISTEN?"
        ),
        (
            "warning: tenant 'acme': allowed_tools: 'Globb' is not a tool of the agent CLI, which "
            "ignores it; did you mean 'Glob'?"
        ),
    ], warnings
    assert warnings[2].startswith(
        "warning: tenant 'acme': allowed_tools: 'Frobnicate' is not a tool of the agent CLI, "
        "which ignores it; its tools are AskUserQuestion, Bash, "
    ), warnings
    assert warnings[3:] == [
        (
            "warning: tenant 'acme': daily_limit_usd = '5' is a string; write the number without "
            "quotes (daily_limit_usd = 5)"
        )
    ], warnings
