"""PgBouncer (Debian's package, `make setup` installs it) in transaction mode in front of
the test PostgreSQL, as an operator runs it for many replicas:

    with running_pgbouncer() as bouncer:
        start_harness(bouncer.url(database_url), database_listen_url=database_url)

Trust authentication, a temporary ini and auth file, a free loopback port. Tests that need
it skip when it is not installed (or there is no test PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from harness import TEST_PG_URL
from sqlalchemy.engine import make_url
from test_server_process import free_port

BINARY = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer",) if os.access(p, os.X_OK)), None
)


@dataclass
class PgBouncer:
    """A running pgbouncer and where it listens."""

    proc: subprocess.Popen[bytes]
    port: int
    folder: Path

    def url(self, database_url: str) -> str:
        """`database_url` (a test database's) through this pgbouncer."""
        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def log(self) -> str:
        return (self.folder / "pgbouncer.log").read_text(errors="replace")


def _ini(port: int, upstream_host: str, upstream_port: int, auth_file: Path) -> str:
    return "\n".join(
        [
            "[databases]",
            f"* = host={upstream_host} port={upstream_port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {auth_file}",
            "pool_mode = transaction",
            "default_pool_size = 10",
            "max_client_conn = 500",
            "log_connections = 0",
            "log_disconnections = 0",
            "",
        ]
    )


@contextlib.contextmanager
def running_pgbouncer(upstream: str = TEST_PG_URL) -> Iterator[PgBouncer]:
    """pgbouncer in transaction mode in front of `upstream`'s server, until exit."""
    if not upstream:
        pytest.skip("PgBouncer fronts PostgreSQL: set AGENTPLANE_TEST_DATABASE_URL")
    if BINARY is None:
        pytest.skip("pgbouncer is not installed (`make setup` as root installs it)")
    target = make_url(upstream)
    folder = Path(tempfile.mkdtemp(prefix="pgb", dir="/tmp"))
    # pgbouncer refuses to run as root: it then runs as nobody, who must read these.
    folder.chmod(0o755)
    auth_file = folder / "users.txt"
    auth_file.write_text(f'"{target.username or "postgres"}" ""\n')
    port = free_port()
    ini = folder / "pgbouncer.ini"
    ini.write_text(_ini(port, target.host or "127.0.0.1", target.port or 5432, auth_file))
    for path in (auth_file, ini):
        path.chmod(0o644)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    with (folder / "pgbouncer.log").open("wb") as log:
        proc = subprocess.Popen([BINARY, *user, str(ini)], stdout=log, stderr=log)
    bouncer = PgBouncer(proc, port, folder)
    try:
        _wait_ready(bouncer, upstream)
        yield bouncer
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(bouncer: PgBouncer, upstream: str) -> None:
    """Until a query through it is answered (30 s at most)."""
    url = make_url(bouncer.url(upstream)).set(drivername="postgresql")
    deadline = time.monotonic() + 30
    while True:
        if bouncer.proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited {bouncer.proc.returncode}:\n{bouncer.log()}")
        try:
            with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as c:
                c.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def routed(
    database_url: str, route: str, request: pytest.FixtureRequest
) -> tuple[str, dict[str, str]]:
    """The database URL and settings of a replica straight on PostgreSQL ("direct"), or
    with its pools through PgBouncer (conftest.py's `bouncer`) and its LISTEN connection
    straight ("pgbouncer")."""
    if route == "direct":
        return database_url, {}
    pooled: PgBouncer = request.getfixturevalue("bouncer")
    return pooled.url(database_url), {"database_listen_url": database_url}
