"""Benchmark 9 (rows): what the pending record of a model request costs it. Small Messages
requests through the metering gateway to the sandbox model, one at a time, with the
gateway writing each one's pending record first (`money.in_flight.PendingWriter`, on
the database) against the same gateway writing none (interleaved); the added latency is
the difference of the medians. A burst of requests at once is written in one commit.

Run alone: `python tests/bench/pending.py [DATABASE_URL]` (default: a SQLite file).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp
from agentplane.server.domain import Session, SessionState, utcnow
from agentplane.server.gateway.meter import SessionMeter
from agentplane.server.gateway.proxy import MeteringGateway
from agentplane.server.model_double import SandboxServer
from agentplane.server.money.in_flight import PendingWriter
from agentplane.server.money.pricing import PriceTable
from agentplane.server.store import sessions as repo
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import row

REQUESTS = 60
GOAL_MS = 10.0
BODY = json.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "hello"}],
    }
).encode()


async def post(http: aiohttp.ClientSession, gateway: MeteringGateway, meter: SessionMeter) -> float:
    headers = {"x-api-key": meter.token, "anthropic-version": "2023-06-01"}
    start = time.perf_counter()
    async with http.post(gateway.base_url + "/v1/messages", data=BODY, headers=headers) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - start


async def measure(database_url: str, requests: int = REQUESTS) -> tuple[float, float, int]:
    """(median ms with the record, median ms without, commits of a burst of 20)."""
    engine = create_engine(database_url, purpose="bench")
    try:
        await migrate(engine)
        db = sessionmaker(engine)
        session = Session(
            id=str(uuid.uuid4()),
            tenant="bench",
            state=SessionState.RUNNING,
            create_time=utcnow(),
            max_budget_usd=Decimal(1000),
            max_turns=3,
            allowed_tools=("Read",),
        )
        async with db.begin() as s:
            await repo.insert_session(s, session, request_hash="h", budget_day="2026-12-07")
        async with (
            SandboxServer() as sandbox,
            MeteringGateway(PriceTable.load()) as gateway,
            aiohttp.ClientSession() as http,
        ):
            writer = PendingWriter(db, "bench")
            meter = gateway.open_session(
                session.id,
                budget_usd=Decimal(1000),
                upstream_base_url=sandbox.base_url,
                upstream_api_key="sk-ant-bench",
            )
            meter.on_request = lambda _request: None  # a running session's
            recorded: list[float] = []
            bare: list[float] = []
            for i in range(requests // 2 + 5):  # interleaved; the first rounds warm up
                for use in (writer, None) if i % 2 else (None, writer):
                    gateway.in_flight = use
                    took = await post(http, gateway, meter)
                    if i >= 5:
                        (recorded if use else bare).append(took)
            gateway.in_flight = writer
            commits = 0

            def committed(_conn: object) -> None:
                nonlocal commits
                commits += 1

            event.listen(engine.sync_engine, "commit", committed)
            await asyncio.gather(*(post(http, gateway, meter) for _ in range(20)))
            event.remove(engine.sync_engine, "commit", committed)
            return (
                statistics.median(recorded) * 1000,
                statistics.median(bare) * 1000,
                commits,
            )
    finally:
        await engine.dispose()


async def run(database_url: str, label: str) -> list[str]:
    recorded, bare, commits = await measure(database_url)
    added = recorded - bare
    return [
        row(
            f"model request through the gateway, its pending record written first, {label}: "
            "median ms (added); commits for a burst of 20",
            f"{recorded:.1f} (+{added:.1f}); {commits}",
            f"no record {bare:.1f}",
            "-",
            f"added <= {GOAL_MS:g} ms; met: {'yes' if added <= GOAL_MS else 'no'}",
        )
    ]


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{tempfile.mkdtemp()}/pending.db"
    label = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    for line in asyncio.run(run(url, label)):
        print(line)
