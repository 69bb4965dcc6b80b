"""Shared fixtures: every database test runs on SQLite and, when
AGENTPLANE_TEST_DATABASE_URL is set, on PostgreSQL too."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agentplane.server.sandbox.cli_env import SessionDirs
from harness import TEST_PG_URL, Harness, PostgresDatabase, short_dir, start_harness, stop_harness
from pgbouncer import PgBouncer, routed, running_pgbouncer

BACKENDS = ["sqlite"] + (["postgresql"] if TEST_PG_URL else [])


@pytest.fixture(scope="module", params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, empty database for one test module."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db')}/agentplane.db"
        return
    db = PostgresDatabase(TEST_PG_URL)
    yield db.create()
    db.drop()


@pytest.fixture(scope="module")
async def harness(database_url: str) -> AsyncIterator[Harness]:
    """A running server with the sandbox model, shared by a test module."""
    h = await start_harness(database_url)
    yield h
    await stop_harness(h)


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the test PostgreSQL (see pgbouncer.py)."""
    with running_pgbouncer() as running:
        yield running


@pytest.fixture(params=["direct", "pgbouncer"])
async def replicas(
    database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two servers on one PostgreSQL database (skipped on SQLite, which serves one),
    straight on it or through PgBouncer."""
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share a PostgreSQL database (SQLite serves one server)")
    url, route = routed(database_url, request.param, request)
    owner = await start_harness(url, **route)
    other = await start_harness(url, **route)
    yield owner, other
    await stop_harness(other)
    await stop_harness(owner)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh, empty folder with a short path (see `short_dir`), removed afterwards: for
    session folders and servers' work folders, which tmp_path's long paths would not fit."""
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def session_dirs(short_tmp: Path) -> SessionDirs:
    """One session's folders, created, in `short_tmp`."""
    dirs = SessionDirs(short_tmp / "s")
    dirs.create()
    return dirs
