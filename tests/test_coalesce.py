"""Coalesced reads share work under load and never answer with a read older than the call."""

from __future__ import annotations

import asyncio

import pytest
from agentplane.server.coalesce import Coalescer

pytestmark = pytest.mark.asyncio


class Source:
    """A value that reads see as it was when the read started, 20 ms later."""

    def __init__(self) -> None:
        self.value = 0
        self.fail = False

    async def read(self) -> int:
        seen = self.value
        if self.fail:
            raise OSError("database unreachable")
        await asyncio.sleep(0.02)
        return seen


async def test_concurrent_callers_share_reads() -> None:
    source, reads = Source(), Coalescer[int]()

    results = await asyncio.gather(*(reads.get("k", source.read) for _ in range(20)))

    assert results == [0] * 20
    assert reads.reads == 1  # all 20 arrived before the one read started


async def test_a_caller_never_gets_a_read_that_started_before_it_asked() -> None:
    source, reads = Source(), Coalescer[int]()
    early = asyncio.create_task(reads.get("k", source.read))
    await asyncio.sleep(0.005)  # its read is under way and has seen 0
    source.value = 1  # a write commits meanwhile

    late = await reads.get("k", source.read)

    assert await early == 0
    assert late == 1  # a read of its own (shared with whoever came with it), not early's
    assert reads.reads == 2


async def test_keys_do_not_share() -> None:
    source, reads = Source(), Coalescer[int]()
    await asyncio.gather(reads.get("a", source.read), reads.get("b", source.read))
    assert reads.reads == 2


async def test_a_failed_read_fails_its_callers_and_the_next_call_reads_again() -> None:
    source, reads = Source(), Coalescer[int]()
    source.fail = True
    outcomes = await asyncio.gather(
        *(reads.get("k", source.read) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, OSError) for o in outcomes)

    source.fail, source.value = False, 7
    assert await reads.get("k", source.read) == 7


async def test_a_caller_that_gives_up_does_not_cancel_the_others() -> None:
    source, reads = Source(), Coalescer[int]()
    quitter = asyncio.create_task(reads.get("k", source.read))
    stayer = asyncio.create_task(reads.get("k", source.read))
    await asyncio.sleep(0.005)
    quitter.cancel()

    assert await stayer == 0
    with pytest.raises(asyncio.CancelledError):
        await quitter
