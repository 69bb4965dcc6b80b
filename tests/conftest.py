"""Shared fixtures: every database test runs on SQLite and, when
AGENTPLANE_TEST_DATABASE_URL is set, on PostgreSQL too."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from harness import TEST_PG_URL, Harness, PostgresDatabase, start_harness, stop_harness

BACKENDS = ["sqlite"] + (["postgresql"] if TEST_PG_URL else [])


@pytest.fixture(scope="module", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
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
