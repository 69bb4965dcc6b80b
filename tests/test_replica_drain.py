"""Three replicas on one PostgreSQL database under load; one is SIGTERMed mid-load. With
agentplane's service config (health-checked round_robin, UNAVAILABLE retried) no caller
sees an error while it drains."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import grpc
import pytest
from agentplane import AsyncClient, RPCError
from agentplane.server.model_double import Script, Step, Usage
from agentplane.v1 import session_pb2
from harness import MODEL, tenant_toml
from replicas_harness import NOT_SERVING, Replica, requires_postgres, start_replicas

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, requires_postgres]

TOKEN = "fleet-token-7"
# Room for the whole load at once: the harness's tenants allow 4 to 8 concurrent sessions.
FLEET_TENANT = tenant_toml(
    "fleet",
    TOKEN,
    anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
    allowed_tools=["Read"],
    daily_limit_usd=1000.0,
    max_session_budget_usd=1.0,
    max_turns=4,
    max_concurrent_sessions=64,
)
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SCRIPTS = {
    "work": Script(steps=[Step(text="done", delay_s=0.5, usage=Usage(200, 20))]),
    # Outlasts the load: the replica that runs it stays in its grace period meanwhile.
    "long": Script(steps=[Step(text="long done", delay_s=8.0, usage=Usage(200, 20))]),
}
CALLS = 40  # every 4th through a client without health checking (as grpc-js is)
SPACING_S = 0.25
SIGTERM_AFTER_S = 2.5
COMPLETE = session_pb2.SESSION_STATE_COMPLETE


def request(script: str) -> session_pb2.RunSessionRequest:
    return session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", model=MODEL)


async def events_of(call: grpc.aio.UnaryStreamCall) -> list[session_pb2.SessionEvent]:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def session_after(delay_s: float, client: AsyncClient) -> session_pb2.Session | RPCError:
    """One RunSession, `delay_s` from now, to its end: the final Session, or the error."""
    await asyncio.sleep(delay_s)
    try:
        events = [e async for e in client.run("[[sandbox:work]] go", model=MODEL)]
    except RPCError as exc:
        return exc
    return events[-1].result.session


def drain_refusals(replica: Replica) -> int:
    """RunSession calls `replica` refused while draining, from its log."""
    count = 0
    for line in replica.log_lines():
        if '"admission_rejected"' not in line:
            continue
        record = json.loads(line)
        count += record.get("event") == "admission_rejected" and record["reason"] == "UNAVAILABLE"
    return count


async def test_sigterm_of_one_replica_fails_no_call_of_a_balanced_client() -> None:
    async with start_replicas(
        3,
        scripts=SCRIPTS,
        extra_tenants=FLEET_TENANT,
        AGENTPLANE_SHUTDOWN_GRACE_S="30",
        AGENTPLANE_MAX_SESSIONS="32",
        # The drain is under test, not the pools: on a busy machine (tests running beside
        # this one) a session's write may wait for its pool longer than 5 s.
        AGENTPLANE_DB_POOL_TIMEOUT_S="30",
    ) as fleet:
        draining = fleet[1]
        held = draining.sessions.RunSession(request("long"), metadata=AUTH)
        held_id = (await held.read()).session_id

        async with (
            AsyncClient(fleet.addresses, token=TOKEN) as balanced,
            # Round robin and retries but no health checking: what grpc-js does with the
            # same config. Every draining replica's refusal must be retried elsewhere.
            AsyncClient(
                fleet.addresses, token=TOKEN, options=[("grpc.inhibit_health_checking", 1)]
            ) as retry_only,
        ):
            assert balanced.balanced and balanced.target == "ipv4:" + ",".join(fleet.addresses)
            load = [
                asyncio.create_task(
                    session_after(i * SPACING_S, retry_only if i % 4 == 3 else balanced)
                )
                for i in range(CALLS)
            ]
            await asyncio.sleep(SIGTERM_AFTER_S)
            terminated_at = dt.datetime.now(dt.UTC)
            draining.terminate()
            await draining.wait_status(NOT_SERVING, "readiness", timeout=30)
            # It refuses new sessions while it drains: a caller without the config fails.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await events_of(draining.sessions.RunSession(request("work"), metadata=AUTH))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert draining.proc.returncode is None  # still in its grace period
            outcomes = await asyncio.gather(*load)

        failed = [o for o in outcomes if isinstance(o, RPCError)]
        assert failed == [], f"{len(failed)} of {CALLS} calls failed: {failed[:3]}"
        finals = [o for o in outcomes if isinstance(o, session_pb2.Session)]
        assert [s.state for s in finals] == [COMPLETE] * CALLS, [
            (s.id, str(s.error)) for s in finals if s.state != COMPLETE
        ]
        # Its running session finished within the grace; then it exited 0.
        assert (await events_of(held))[-1].result.session.state == COMPLETE
        assert await draining.wait(30) == 0, draining.tail()

        rows = {row.id: row for row in await fleet.sessions()}
        assert all(rows[s.id].state == "COMPLETE" for s in finals)
        drained_owner = rows[held_id].owner
        owners = [rows[s.id].owner for s in finals]
        assert len(set(owners)) == 3  # the load went to all three, the drained one too
        after = [
            s.id
            for s in finals
            if rows[s.id].owner == drained_owner and rows[s.id].created_at >= terminated_at
        ]
        assert after == []  # nothing was admitted there once it drained
        # The probe above, and at least one call of `retry_only` that a retry rescued.
        assert drain_refusals(draining) >= 2
