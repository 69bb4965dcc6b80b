"""Benchmarks 1-3: one session's wall time and time to first event, and the control plane's
CPU per session, against the direct SDK; and what the sandbox costs one session, against
the same server with AGENTPLANE_SANDBOX=none. agentplane's sessions run sandboxed (the
default) unless a row says otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from statistics import mean, median

from common import (
    WARM_TOKEN,
    Bench,
    Sample,
    Server,
    cpu_of,
    interleaved,
    met,
    ratio,
    row,
    summary,
    tenants_toml,
    via_agentplane,
    via_sdk,
)
from harness import write_tenants

WARM_AUTH = (("authorization", f"Bearer {WARM_TOKEN}"),)
REFILL_S = 1.5  # untimed pause before each warm session: the pool starts its next agent
# The cold 1-turn figures take this many times the runs of the others (not in --quick): the
# sandbox may cost 10 ms of a session of ~0.6 s that varies by 10-20 % from run to run.
COLD_RUNS = 4
SETTLE_S = 0.2  # untimed pause after each cold session, before its CPU is read


@dataclass
class Measured:
    sample: Sample
    cpu_s: float = 0.0  # CPU of everything its server ran meanwhile (its CpuGroup)
    own_s: float = 0.0  # of that, the server process's own


async def measured(server: Server | None, run: Callable[[], Awaitable[Sample]]) -> Measured:
    """One session and the CPU its server used meanwhile, read after a pause in which what
    is left of the session ends. `server` None (the direct SDK), or a server without a
    CpuGroup: the same pause, no CPU."""
    if server is None or server.cpu.path is None:
        sample = await run()
        await asyncio.sleep(SETTLE_S)
        return Measured(sample)
    total, own = server.cpu.cpu_s(), cpu_of(server.pid)[0]
    sample = await run()
    await asyncio.sleep(SETTLE_S)
    return Measured(sample, server.cpu.cpu_s() - total, cpu_of(server.pid)[0] - own)


@asynccontextmanager
async def sandboxed_and_not(bench: Bench) -> AsyncIterator[tuple[Server, Server]]:
    """Two SQLite servers alike but for AGENTPLANE_SANDBOX (`bwrap`, the default, and
    `none`), without a warm pool: an idle warm agent's CPU would count in theirs."""
    folder = bench.work / "c"
    folder.mkdir()
    tenants = write_tenants(
        folder, tenants_toml(bench.template, adm_runs=0, adm_admits=0, warm=False)
    )
    servers: list[Server] = []
    try:
        for name, settings in (("sandboxed", {}), ("unsandboxed", {"AGENTPLANE_SANDBOX": "none"})):
            servers.append(
                await Server.start(
                    label=f"SQLite, {name}",
                    database_url=f"sqlite:///{folder}/{name[0]}.db",
                    sandbox_url=bench.sandbox.base_url,
                    tenants_file=tenants,
                    work=folder / name[0],
                    settings=settings,
                )
            )
        boxed, bare = servers
        assert await boxed.sandboxed(), "AGENTPLANE_SANDBOX's default does not sandbox"
        assert not await bare.sandboxed(), "AGENTPLANE_SANDBOX=none did not take"
        for server in servers:
            await via_agentplane(server.sessions, "one")  # warm-up: imports, connections
        yield boxed, bare
    finally:
        for server in servers:
            await server.stop()


async def cold(bench: Bench) -> list[str]:
    """A cold 1-turn session sandboxed, unsandboxed and with the direct SDK, interleaved
    A B C A B C ...: sandboxed against the SDK; the sandbox's own cost (sandboxed minus
    unsandboxed) in wall time and in CPU; the control plane's share of the CPU."""
    runs = bench.runs if bench.quick else COLD_RUNS * bench.runs
    async with sandboxed_and_not(bench) as (boxed, bare):
        no_cpu = boxed.cpu.why or bare.cpu.why
        ours, unboxed, sdk = await interleaved(
            runs,
            lambda: measured(boxed, lambda: via_agentplane(boxed.sessions, "one")),
            lambda: measured(bare, lambda: via_agentplane(bare.sessions, "one")),
            lambda: measured(None, lambda: via_sdk(bench.sandbox.base_url, "one")),
        )
    a, b, c = ([m.sample.wall_s for m in ms] for ms in (ours, unboxed, sdk))
    fa, fc = [m.sample.first_s for m in ours], [m.sample.first_s for m in sdk]
    wall_ms = (median(a) - median(b)) * 1000
    lines = [
        row(
            "1-turn session, wall",
            f"{summary(a)} s",
            f"{summary(c)} s",
            ratio(a, c),
            met("<= 1.05 (cold)", median(a) <= 1.05 * median(c)),
        ),
        row(
            "time to first agent event",
            f"{summary(fa)} s",
            f"{summary(fc)} s",
            ratio(fa, fc),
            met("<= 0.4 (needs the warm pool)", median(fa) <= 0.4 * median(fc)),
        ),
        row(
            "sandbox cost: 1-turn session, wall",
            f"{summary(a)} s sandboxed",
            f"{summary(b)} s unsandboxed",
            f"{wall_ms:+.1f} ms ({ratio(a, b)})",
            met("<= +10 ms", wall_ms <= 10),
        ),
    ]
    cost = "sandbox cost: CPU per 1-turn session (server, CLI, bwrap, socat, sh)"
    if no_cpu:
        return [
            *lines,
            row(cost, f"not measured: {no_cpu}", "-", "-", "<= +0.01 CPU-s"),
            row("control-plane CPU per session", f"not measured: {no_cpu}", "-", "-", "<= 0.05"),
        ]
    ca, cb = [m.cpu_s for m in ours], [m.cpu_s for m in unboxed]
    cpu = median(ca) - median(cb)
    server = mean(m.own_s for m in ours)  # ticks of 10 ms: a mean, not a median
    rest = mean(m.cpu_s - m.own_s for m in ours)
    return [
        *lines,
        row(
            cost,
            f"{summary(ca)} CPU-s sandboxed",
            f"{summary(cb)} CPU-s unsandboxed",
            f"{cpu:+.3f} CPU-s ({ratio(ca, cb)})",
            met("<= +0.01 CPU-s", cpu <= 0.01),
        ),
        row(
            "control-plane CPU per session",
            f"{server:.3f} CPU-s",
            f"CLI and its sandbox {rest:.3f} CPU-s",
            ratio(server, rest),
            met("<= 0.05", server <= 0.05 * rest),
        ),
    ]


async def warm_pool(bench: Bench, server: Server) -> list[str]:
    """Wall time and time to first event for a tenant whose warm pool keeps one (sandboxed)
    agent started. Both sides pause before each run (untimed), so the pool's refill never
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
        row(
            "1-turn session, wall, warm pool",
            f"{summary(a)} s",
            f"{summary(b)} s",
            ratio(a, b),
            met("< 1.0 (warm)", median(a) < median(b)),
        ),
        row(
            "time to first agent event, warm pool",
            f"{summary(fa)} s",
            f"{summary(fb)} s",
            ratio(fa, fb),
            met("<= 0.4", median(fa) <= 0.4 * median(fb)),
        ),
    ]


async def run(bench: Bench, server: Server) -> list[str]:
    assert await server.sandboxed(), "benchmarks 1-3 measure sandboxed sessions (the default)"
    lines = await cold(bench)
    lines += await warm_pool(bench, server)
    ours, theirs = await interleaved(
        bench.runs,
        lambda: via_agentplane(server.sessions, "tools"),
        lambda: via_sdk(bench.sandbox.base_url, "tools"),
    )
    a, b = [x.wall_s for x in ours], [x.wall_s for x in theirs]
    lines.append(
        row(
            "3-tool-turn session, wall",
            f"{summary(a)} s",
            f"{summary(b)} s",
            ratio(a, b),
            met("<= 1.05 (cold)", median(a) <= 1.05 * median(b)),
        )
    )
    return lines
