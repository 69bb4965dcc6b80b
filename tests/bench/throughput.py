"""Benchmark 4: saturation throughput, completed sessions per second at a given concurrency,
through agentplane and with the direct SDK (closed loop: each caller starts its next session
when its last one ended)."""

from __future__ import annotations

from common import (
    Bench,
    Server,
    closed_loop,
    interleaved,
    ratio,
    row,
    summary,
    via_agentplane,
    via_sdk,
)

LEVELS = (1, 2, 4, 8)
QUICK_LEVELS = (1, 2)


def sessions_per_run(concurrency: int, quick: bool) -> int:
    """Enough sessions that every caller runs at least two (one in --quick)."""
    return concurrency if quick else max(4, 2 * concurrency)


async def agentplane_rate(server: Server, concurrency: int, total: int) -> float:
    return await closed_loop(concurrency, total, lambda: via_agentplane(server.sessions, "one"))


async def run(bench: Bench, server: Server) -> list[str]:
    lines = []
    for c in QUICK_LEVELS if bench.quick else LEVELS:
        total = sessions_per_run(c, bench.quick)
        ours, theirs = await interleaved(
            bench.runs,
            lambda c=c, n=total: agentplane_rate(server, c, n),
            lambda c=c, n=total: closed_loop(c, n, lambda: via_sdk(bench.sandbox.base_url, "one")),
        )
        lines.append(
            row(
                f"sessions/s at concurrency {c}",
                f"{summary(ours, '.2f')} /s",
                f"{summary(theirs, '.2f')} /s",
                ratio(ours, theirs),
                ">= 0.95",
            )
        )
    return lines
