"""A PostgreSQL server of the test's own, with initdb's defaults (max_connections 100).

For a test that fills a server's connections: on the shared test server, tests running at
the same time (pytest-xdist) would take some of them. The server listens on loopback on a
free port, trusts local connections, and is stopped and removed afterwards. Needs the
PostgreSQL server binaries (Debian's `postgresql` package, as on the CI machine).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import short_dir
from test_server_process import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: Path(p).parts)
    return Path(found[-1]).parent if found else None


@contextmanager
def private_postgres() -> Iterator[str]:
    """A fresh PostgreSQL server with default settings; yields its admin URL."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("the PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are missing")
    folder = short_dir()
    data = folder / "data"
    # PostgreSQL refuses to run as root: as root, its files and process are postgres's.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    port = free_port()
    run = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres"]
        + ["--auth=trust", "--no-sync", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run, "-o", options, "-l", str(folder / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run, "-m", "immediate", "stop"], check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
