"""Benchmarks 1-3: one session's wall time and time to first event, and the control plane's
CPU per session, against the direct SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from common import (
    WARM_TOKEN,
    Bench,
    Sample,
    Server,
    cpu_of,
    interleaved,
    ratio,
    row,
    summary,
    via_agentplane,
    via_sdk,
)

WARM_AUTH = (("authorization", f"Bearer {WARM_TOKEN}"),)
REFILL_S = 1.5  # untimed pause before each warm session: the pool starts its next agent


async def warm_pool(bench: Bench, server: Server) -> list[str]:
    """Wall time and time to first event for a tenant whose warm pool keeps one agent
    started. Both sides pause before each run (untimed), so the pool's refill never
    competes with either for the CPU."""

    async def rested(run: Callable[[], Awaitable[Sample]]) -> Sample:
        await asyncio.sleep(REFILL_S)
        return await run()

    ours, theirs = await interleaved(
        bench.runs,
        lambda: rested(lambda: via_agentplane(server.sessions, "one", WARM_AUTH)),
        lambda: rested(lambda: via_sdk(bench.sandbox.base_url, "one")),
    )
    a, b = [x.wall_s for x in ours], [x.wall_s for x in theirs]
    fa, fb = [x.first_s for x in ours], [x.first_s for x in theirs]
    return [
        row("1-turn session, wall, warm pool", f"{summary(a)} s", f"{summary(b)} s",
            ratio(a, b), "< 1.0 (warm)"),
        row("time to first agent event, warm pool", f"{summary(fa)} s", f"{summary(fb)} s",
            ratio(fa, fb), "<= 0.4"),
    ]


async def run(bench: Bench, server: Server) -> list[str]:
    base_url = bench.sandbox.base_url
    lines = []
    for script, label in (("one", "1-turn session, wall"), ("tools", "3-tool-turn session, wall")):
        ours, theirs = await interleaved(
            bench.runs,
            lambda s=script: via_agentplane(server.sessions, s),
            lambda s=script: via_sdk(base_url, s),
        )
        a, b = [x.wall_s for x in ours], [x.wall_s for x in theirs]
        lines.append(row(label, f"{summary(a)} s", f"{summary(b)} s", ratio(a, b), "<= 1.05 (cold)"))
        if script == "one":
            fa, fb = [x.first_s for x in ours], [x.first_s for x in theirs]
            lines.append(row("time to first agent event", f"{summary(fa)} s", f"{summary(fb)} s",
                             ratio(fa, fb), "<= 0.4 (needs the warm pool)"))
            lines += await warm_pool(bench, server)

    own0, kids0 = cpu_of(server.pid)
    for _ in range(bench.runs):
        await via_agentplane(server.sessions, "one")
    own1, kids1 = cpu_of(server.pid)
    per_server = (own1 - own0) / bench.runs
    per_cli = (kids1 - kids0) / bench.runs
    lines.append(row("control-plane CPU per session", f"{per_server:.3f} CPU-s",
                     f"CLI {per_cli:.3f} CPU-s", ratio(per_server, per_cli), "<= 0.05"))
    return lines
