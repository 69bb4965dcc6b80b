"""Capacity is the fleet's: a full replica refuses a session with UNAVAILABLE/REPLICA_FULL
and turns its readiness NOT_SERVING, so a caller using agentplane's service config
(health-checked round_robin, UNAVAILABLE retried) is served by a replica with room; a
tenant's own limit stays RESOURCE_EXHAUSTED, never retried, so one tenant's burst takes at
most its own share of the fleet."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from agentplane import service_config
from agentplane.server.model_double import Script, Step
from agentplane.v1 import session_pb2, session_pb2_grpc
from harness import MODEL, error_details, tenant_toml
from replicas_harness import NOT_SERVING, SERVING, Replicas, requires_postgres, start_replicas

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, requires_postgres]

PER_REPLICA = 3
SCRIPTS = {"hang": Script(steps=[Step(hang=True)])}
TENANTS = "".join(
    tenant_toml(
        name,
        f"{name}-token-26",
        anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
        allowed_tools=["Read"],
        daily_limit_usd=1000.0,
        max_session_budget_usd=1.0,
        max_concurrent_sessions=cap,
    )
    for name, cap in (("roomy", 64), ("bursty", 2), ("calm", 64))
)
HANG = session_pb2.RunSessionRequest(prompt="[[sandbox:hang]] wait", model=MODEL)


def auth(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {tenant}-token-26"),)


@dataclass
class Balanced:
    """Stubs over every replica with the service configs the README documents: RunSession
    balanced on `agentplane.admission`, every other call on `readiness`."""

    admissions: session_pb2_grpc.SessionServiceStub
    sessions: session_pb2_grpc.SessionServiceStub


@contextlib.asynccontextmanager
async def balanced(fleet: Replicas) -> AsyncIterator[Balanced]:
    target = "ipv4:" + ",".join(fleet.addresses)

    def options(admission: bool) -> list[tuple[str, object]]:
        config = service_config(admission=admission)
        return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]

    async with (
        grpc.aio.insecure_channel(target, options=options(True)) as admit,
        grpc.aio.insecure_channel(target, options=options(False)) as other,
    ):
        yield Balanced(
            session_pb2_grpc.SessionServiceStub(admit), session_pb2_grpc.SessionServiceStub(other)
        )


class Held:
    """Running sessions kept open (their agents wait on the model) until `cancel_all`."""

    def __init__(self) -> None:
        self.calls: list[grpc.aio.UnaryStreamCall] = []
        self.ids: list[str] = []

    async def start(self, stub: session_pb2_grpc.SessionServiceStub, tenant: str) -> str:
        """One session; returns its id once it is admitted (its `started` event)."""
        call = stub.RunSession(HANG, metadata=auth(tenant))
        self.calls.append(call)
        first = await call.read()
        assert first.HasField("started"), first
        self.ids.append(first.session_id)
        return first.session_id

    async def cancel(
        self, stub: session_pb2_grpc.SessionServiceStub, tenant: str, sid: str
    ) -> None:
        await stub.CancelSession(
            session_pb2.CancelSessionRequest(session_id=sid), metadata=auth(tenant)
        )

    def close(self) -> None:
        for call in self.calls:
            call.cancel()  # on_disconnect CANCEL: each session ends cancelled


async def owners(fleet: Replicas) -> dict[str, str]:
    """Session id -> the replica (lease owner) that runs it."""
    return {row.id: row.owner for row in await fleet.sessions()}


async def test_a_burst_runs_on_the_fleet_while_one_replica_is_full() -> None:
    async with start_replicas(
        2, scripts=SCRIPTS, extra_tenants=TENANTS, AGENTPLANE_MAX_SESSIONS=str(PER_REPLICA)
    ) as fleet:
        busy, idle = fleet[0], fleet[1]
        held = Held()
        try:
            # `busy` has one place left, `idle` all three.
            for _ in range(PER_REPLICA - 1):
                await held.start(busy.sessions, "roomy")
            async with balanced(fleet) as stub:
                # A burst of the fleet's free places: every session runs, none is refused.
                burst = await asyncio.gather(
                    *(held.start(stub.admissions, "roomy") for _ in range(PER_REPLICA + 1))
                )
                await busy.wait_status(NOT_SERVING, "agentplane.admission")
                await idle.wait_status(NOT_SERVING, "agentplane.admission")
                assert await busy.status("readiness") == SERVING  # for every other call
                where = await owners(fleet)
                busy_owner = where[held.ids[0]]
                placed = [where[sid] == busy_owner for sid in burst]
                assert placed.count(True) == 1 and placed.count(False) == PER_REPLICA

                # A full replica answers UNAVAILABLE/REPLICA_FULL with when to retry.
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await busy.sessions.RunSession(HANG, metadata=auth("roomy")).read()
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                details = error_details(caught.value)
                assert details["ErrorInfo"].reason == "REPLICA_FULL"
                assert "RetryInfo" in details
                # The whole fleet full: a new session is refused, UNAVAILABLE; reads still work.
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.admissions.RunSession(HANG, metadata=auth("roomy")).read()
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

                await stub.sessions.GetSession(
                    session_pb2.GetSessionRequest(session_id=burst[0]), metadata=auth("roomy")
                )
                # A place frees on `busy`: it takes sessions again and the next one runs there.
                await held.cancel(stub.sessions, "roomy", held.ids[0])
                await busy.wait_status(SERVING, "agentplane.admission")
                again = await held.start(stub.admissions, "roomy")
                assert (await owners(fleet))[again] == busy_owner
        finally:
            held.close()
        assert not any(
            '"reason": "INTERNAL"' in line for r in fleet.replicas for line in r.log_lines()
        )


async def test_one_tenants_burst_does_not_starve_another() -> None:
    async with start_replicas(
        2, scripts=SCRIPTS, extra_tenants=TENANTS, AGENTPLANE_MAX_SESSIONS=str(PER_REPLICA)
    ) as fleet:
        held = Held()
        try:
            async with balanced(fleet) as stub:

                async def attempt(tenant: str) -> str | grpc.aio.AioRpcError:
                    try:
                        return await held.start(stub.admissions, tenant)
                    except grpc.aio.AioRpcError as exc:
                        return exc

                # `bursty` (its limit: 2 at once) asks for the whole fleet and more.
                burst = await asyncio.gather(*(attempt("bursty") for _ in range(2 * PER_REPLICA)))
                refused = [r for r in burst if isinstance(r, grpc.aio.AioRpcError)]
                assert len(burst) - len(refused) == 2
                assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
                assert {error_details(r)["ErrorInfo"].reason for r in refused} == {
                    "CONCURRENCY_LIMIT"
                }
                # The rest of the fleet is `calm`'s: all of its sessions run.
                calm = await asyncio.gather(*(attempt("calm") for _ in range(2 * PER_REPLICA - 2)))
                assert all(isinstance(r, str) for r in calm), calm
        finally:
            held.close()
        # A tenant's own limit is not retried on the other replica: one refusal per call
        # (a full replica's REPLICA_FULL, retried elsewhere, may come too).
        rejected = [
            json.loads(line)
            for r in fleet.replicas
            for line in r.log_lines()
            if '"admission_rejected"' in line
        ]
        limited = [r["tenant"] for r in rejected if r["reason"] == "CONCURRENCY_LIMIT"]
        assert limited == ["bursty"] * (2 * PER_REPLICA - 2)
        assert {r["reason"] for r in rejected} <= {"CONCURRENCY_LIMIT", "REPLICA_FULL"}
