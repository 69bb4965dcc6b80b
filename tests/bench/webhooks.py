"""Benchmark 11: webhooks. Delivery latency: a session's end (its `end_time`) to the moment
a healthy receiver in the bench process got its signed `session.ended` (same machine, same
clock), p50/p99 over the sessions of a run. Isolation: 10 receivers of one tenant that
accept connections and never answer (each delivery waits out the sender's timeout, then
retries) against the wall time of another tenant's 1-turn sessions and against the
healthy tenant's delivery latency, both measured before the dead receivers' deliveries
exist and while they are retried.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import time
from collections.abc import Sequence
from datetime import UTC

from agentplane.v1 import session_pb2
from aiohttp import web
from common import MODEL, Bench, Server, percentile, ratio, row, summary, via_agentplane
from harness import tenant_toml
from standardwebhooks import Webhook

SECRET_ENV = "BENCH_WEBHOOK_SECRET"  # not AGENTPLANE_: the servers keep it
HOOKED, DEAD = "hooked-token", "dead-hooks-token"
DEAD_RECEIVERS = 10
SESSIONS, QUICK_SESSIONS = 20, 1  # per run, for the latency figure
GOAL_LATENCY = "p99 < 1 s"
GOAL_ISOLATION = "<= 1.1x"


class Receivers:
    """A healthy receiver (verifies, records when each session's end arrived) and the
    dead ones (accept, never answer), on loopback ports of their own."""

    def __init__(self) -> None:
        self.secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        os.environ[SECRET_ENV] = self.secret  # the server processes inherit it
        self._verifier = Webhook(self.secret)
        self.arrived: dict[str, float] = {}  # session id -> time.time() of receipt
        self._new = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self.healthy = ""
        self.dead: list[str] = []

    async def start(self) -> None:
        healthy = web.Application()
        healthy.router.add_post("/ended", self._ended)
        self.healthy = await self._serve(healthy) + "/ended"
        for _ in range(DEAD_RECEIVERS):
            dead = web.Application()
            dead.router.add_post("/dead", self._never)
            self.dead.append(await self._serve(dead) + "/dead")

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def _ended(self, request: web.Request) -> web.Response:
        at = time.time()
        body = await request.read()
        payload = self._verifier.verify(body, dict(request.headers))
        self.arrived.setdefault(payload["data"]["session"]["id"], at)
        self._new.set()
        return web.Response(status=204)

    async def _never(self, request: web.Request) -> web.Response:
        await asyncio.Event().wait()  # until the sender gives up (its timeout)
        raise AssertionError("unreachable")

    async def arrival(self, session_id: str, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        while session_id not in self.arrived:
            self._new.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no session.ended for {session_id}")
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                continue
        return self.arrived[session_id]

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def tenants_toml(self) -> str:
        """`hooked` (its sessions' ends to the healthy receiver) and `deadhooks` (its
        sessions' ends to the 10 dead ones, retried every ~0.5 s for an hour)."""
        key = "AGENTPLANE_TEST_ACME_KEY"
        common = {
            "anthropic_api_key_env": key,
            "allowed_tools": ["Read"],
            "daily_limit_usd": 100000.0,
            "max_concurrent_sessions": 64,
        }
        hooked = tenant_toml("hooked", HOOKED, **common) + (
            f'\n[tenants.hooked.webhooks]\nsecret_env = "{SECRET_ENV}"\n'
            f'[tenants.hooked.webhooks.endpoints.main]\nurl = "{self.healthy}"\n'
            'events = ["session.ended"]\n'
        )
        dead = tenant_toml("deadhooks", DEAD, **common) + (
            f'\n[tenants.deadhooks.webhooks]\nsecret_env = "{SECRET_ENV}"\n'
            "first_retry_s = 0.2\nmax_retry_delay_s = 0.5\nretry_s = 3600\n"
            f"max_concurrent = {DEAD_RECEIVERS}\n"
            + "".join(
                f'[tenants.deadhooks.webhooks.endpoints.dead{i}]\nurl = "{url}"\n'
                'events = ["session.ended"]\n'
                for i, url in enumerate(self.dead)
            )
        )
        return hooked + "\n" + dead


async def _latencies(server: Server, receivers: Receivers, count: int) -> list[float]:
    """Seconds from each of `count` sessions' end to its webhook's arrival."""
    out = []
    for _ in range(count):
        call = server.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="[[sandbox:one]] go", model=MODEL),
            metadata=(("authorization", f"Bearer {HOOKED}"),),
        )
        final = [e async for e in call][-1].result.session
        ended = final.end_time.ToDatetime(tzinfo=UTC).timestamp()
        out.append(await receivers.arrival(final.id) - ended)
    return out


async def _walls(server: Server, runs: int) -> list[float]:
    return [(await via_agentplane(server.sessions, "one")).wall_s for _ in range(runs)]


def _ms(values: Sequence[float], p: float) -> float:
    return percentile(values, p) * 1000


async def run(bench: Bench, server: Server, receivers: Receivers) -> list[str]:
    count = QUICK_SESSIONS if bench.quick else SESSIONS
    walls = 1 if bench.quick else bench.runs * 2
    healthy = [await _latencies(server, receivers, count) for _ in range(bench.runs)]
    before = await _walls(server, walls)

    # The dead receivers' deliveries: two sessions' ends to each, retried from now on.
    for _ in range(1 if bench.quick else 2):
        call = server.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="[[sandbox:one]] go", model=MODEL),
            metadata=(("authorization", f"Bearer {DEAD}"),),
        )
        [e async for e in call]
    await asyncio.sleep(1.0)  # their first attempts are under way
    during = await _walls(server, walls)
    loaded = [await _latencies(server, receivers, count) for _ in range(bench.runs)]

    def p(runs: list[list[float]], q: float) -> list[float]:
        return [_ms(latencies, q) for latencies in runs]

    p99 = statistics.median(p(loaded, 99))
    return [
        row(
            f"webhook delivery latency p50 / p99, sessions per run: {count}",
            f"{summary(p(healthy, 50), '.0f')} / {summary(p(healthy, 99), '.0f')} ms",
            "—",
            "—",
            f"{GOAL_LATENCY}: "
            + ("met" if statistics.median(p(healthy, 99)) < 1000 else "NOT met"),
        ),
        row(
            f"webhook delivery latency p50 / p99, {DEAD_RECEIVERS} dead receivers of "
            "another tenant",
            f"{summary(p(loaded, 50), '.0f')} / {summary(p(loaded, 99), '.0f')} ms",
            f"{summary(p(healthy, 99), '.0f')} ms (p99, none dead)",
            ratio(p(loaded, 99), p(healthy, 99)),
            f"{GOAL_LATENCY}: " + ("met" if p99 < 1000 else "NOT met"),
        ),
        row(
            f"1-turn session wall time, {DEAD_RECEIVERS} dead receivers of another tenant",
            f"{summary(during)} s",
            f"{summary(before)} s (none)",
            ratio(during, before),
            f"{GOAL_ISOLATION}: "
            + (
                "met" if statistics.median(during) <= 1.1 * statistics.median(before) else "NOT met"
            ),
        ),
    ]
