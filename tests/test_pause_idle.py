"""A paused session's idle timeout is suspended.

The server's idle timeout is short here (4 s) and the tenant's pause longer (8 s): a session
paused at its budget ends when its pause runs out (ERROR/BUDGET_EXCEEDED), not as idle
(ERROR/TIMEOUT). The test waits for the session's end, never on a clock; before the pause the
sandbox model answers at once, so no gap of 4 s comes from the session itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from agentplane.v1 import session_pb2
from harness import Harness, start_harness, stop_harness, tenant_toml
from test_budget_pause import PER_REQUEST, THREE, until_paused

pytestmark = pytest.mark.asyncio

TOKEN = "dozer-token-4"
IDLE_S, PAUSE_S = 4, 8


@pytest.fixture(scope="module")
async def dozing(database_url: str) -> AsyncIterator[Harness]:
    tenant = tenant_toml(
        "dozer",
        TOKEN,
        anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
        allowed_tools=["Glob"],
        on_budget_exhausted="PAUSE",
        max_pause_s=PAUSE_S,
    )
    h = await start_harness(database_url, extra_tenants=tenant, session_idle_timeout_s=IDLE_S)
    h.sandbox.add_script("three", THREE)
    yield h
    await stop_harness(h)


async def test_a_pause_longer_than_the_idle_timeout_ends_as_a_pause(dozing: Harness) -> None:
    paused = await until_paused(dozing.sessions, "dozer", token=TOKEN)
    final = await paused.finish()
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_BUDGET_EXCEEDED, final.error
    assert Decimal(final.cost_usd) == 2 * PER_REQUEST
    # It was paused for its whole `max_pause_s`, twice the idle timeout.
    (pause,) = [e.paused.pause for e in paused.events if e.HasField("paused")]
    assert (pause.deadline.ToDatetime() - pause.since.ToDatetime()).total_seconds() == PAUSE_S
