"""A problem that recurs on every retry (the database gone) is logged with its cause: at
once, then only at growing intervals while it lasts, again when its cause changes, and
once when it is over. Readiness logs its parts (the pools, the LISTEN connection) so."""

from __future__ import annotations

import asyncio
import logging

import pytest
from agentplane.server.health import Health
from agentplane.server.recurring import RecurringProblem
from agentplane.server.store.diagnosis import LISTEN_SETTING, POOLER_HINT, remedy
from agentplane.server.store.notify import Bus, Listener
from harness import TEST_PG_URL, PostgresDatabase
from sqlalchemy.engine import make_url

LOGGER = "agentplane.test.recurring"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_cause_is_logged_once_then_at_growing_intervals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    problem = RecurringProblem(logging.getLogger(LOGGER), "listen: gone", clock=clock)
    caplog.set_level(logging.INFO, LOGGER)
    logged_at = []
    for second in range(40):  # one failure a second, for 40 s
        clock.now = 1000.0 + second
        before = len(caplog.records)
        problem.failed('database "x" does not exist')
        if len(caplog.records) > before:
            logged_at.append(second)
    assert logged_at == [0, 2, 6, 14, 30]  # then every 2, 4, 8, 16 ... (up to 300) s
    first, *repeats = [r.getMessage() for r in caplog.records]
    assert first == 'listen: gone: database "x" does not exist'
    assert repeats[0] == 'listen: gone (still: 3 failures in 2 s): database "x" does not exist'
    assert repeats[-1] == 'listen: gone (still: 31 failures in 30 s): database "x" does not exist'

    caplog.clear()
    clock.now += 1
    problem.failed("connection refused")  # a new cause: at once
    problem.failed("connection refused")
    clock.now += 1
    problem.resolved()
    problem.resolved()  # once
    assert [r.getMessage() for r in caplog.records] == [
        "listen: gone: connection refused",
        "listen: gone: resolved after 2 failures in 1 s",
    ]


def test_a_failure_long_after_the_last_is_a_new_problem(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    problem = RecurringProblem(logging.getLogger(LOGGER), "gone", new_after_s=60, clock=clock)
    caplog.set_level(logging.INFO, LOGGER)
    problem.failed("refused")
    clock.now += 61
    problem.failed("refused")
    assert [r.getMessage() for r in caplog.records] == ["gone: refused", "gone: refused"]


@pytest.mark.parametrize(
    ("cause", "advice"),
    [
        (
            (
                'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
                'FATAL: database "shop" does not exist'
            ),
            (
                "create it (`createdb -h db -p 5433 -U ap shop`), or set AGENTPLANE_DATABASE_URL "
                "to one that exists"
            ),
        ),
        (
            'connection failed: ... FATAL: role "ap" does not exist',
            "create that role, or set the user in AGENTPLANE_DATABASE_URL to one that exists",
        ),
        (
            'connection failed: ... FATAL: password authentication failed for user "ap"',
            "set the right user and password in AGENTPLANE_DATABASE_URL",
        ),
        (
            (
                'connection failed: connection to server at "127.0.0.1", port 5439 failed: '
                "Connection refused"
            ),
            "start the database server, or set AGENTPLANE_DATABASE_URL to where it runs",
        ),
    ],
)
def test_each_database_cause_says_what_to_do(cause: str, advice: str) -> None:
    assert remedy(cause, "postgresql://ap:pw@db:5433/shop") == advice


def test_a_pooler_refusing_startup_options_says_which_url_to_point_where() -> None:
    refused = "connection failed: ... FATAL: unsupported startup parameter: options"
    assert remedy(refused, "postgresql://ap@bouncer:6432/shop") == POOLER_HINT
    listen = remedy(refused, "postgresql://ap@bouncer:6432/shop", LISTEN_SETTING)
    assert listen.startswith("AGENTPLANE_DATABASE_LISTEN_URL looks like PgBouncer's: point it at ")
    # Any other cause names the setting it was given.
    assert remedy("Connection refused", "postgresql://db/shop", LISTEN_SETTING) == (
        "start the database server, or set AGENTPLANE_DATABASE_LISTEN_URL to where it runs"
    )


async def test_the_listener_names_its_cause_and_does_not_repeat_it_every_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The LISTEN connection's failures reach readiness, whose log names the cause once,
    then backs off while it lasts, and says once when it is over."""
    if not TEST_PG_URL:
        pytest.skip("the listener is PostgreSQL's (needs AGENTPLANE_TEST_DATABASE_URL)")
    database = PostgresDatabase(TEST_PG_URL)  # not there until the end
    name = database.name
    caplog.set_level(logging.INFO, "agentplane.server.health")
    health = Health()
    await health.init(listens=True)
    await health.started()  # the start-up verdict ("not ready"): what follows is upkeep's
    url = make_url(database.url).set(drivername="postgresql+psycopg")
    listener = Listener(url, Bus(), status=health.listen, retry_s=0.02)  # retries fast
    task = asyncio.create_task(listener.run())

    def logged() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "agentplane.server.health" and "readiness: listen" in r.getMessage()
        ]

    try:
        async with asyncio.timeout(60):
            while len(logged()) < 2:  # the first repeat is due 2 s after the first line
                await asyncio.sleep(0.05)
            first, repeat = (r.getMessage() for r in logged()[:2])
            assert first.startswith("readiness: listen: the LISTEN connection failed: "), first
            assert f'database "{name}" does not exist' in first
            assert repeat.startswith("readiness: listen (still: "), repeat
            assert f'database "{name}" does not exist' in repeat
            # Every retry in between failed the same way, unlogged.
            assert logged()[1].failures > 2, repeat  # type: ignore[attr-defined]
            database.create()
            while not listener.listening.is_set() or health.problem is not None:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        database.drop()
    ends = [r.getMessage() for r in logged() if "resolved" in r.getMessage()]
    assert len(ends) == 1 and ends[0].startswith("readiness: listen: resolved after "), ends
    await health.shutdown()
