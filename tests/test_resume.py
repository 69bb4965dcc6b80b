"""Conversations across calls, on any replica: the SDK SessionStore on our database."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from decimal import Decimal

import grpc
import pytest
from agentplane.server.model_double import Script, Step, Usage
from agentplane.server.store.engine import create_engine, migrate, sessionmaker
from agentplane.server.store.transcripts import SqlSessionStore, TenantTranscripts
from agentplane.v1 import session_pb2
from claude_agent_sdk.testing import run_session_store_conformance
from harness import Harness, start_harness, stop_harness
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    await migrate(engine)
    yield sessionmaker(engine)
    await engine.dispose()


async def test_the_sql_session_store_passes_the_sdk_conformance_suite(
    db: async_sessionmaker[AsyncSession],
) -> None:
    # Each contract gets a fresh, isolated store: a project-key namespace of its own.
    counter = itertools.count()

    def make_store() -> TenantTranscripts | SqlSessionStore:
        return _Namespaced(SqlSessionStore(db), f"conf{next(counter)}-")

    await run_session_store_conformance(make_store)


class _Namespaced:
    """Prefixes project keys so that the contracts' stores do not see each other's data."""

    def __init__(self, store: SqlSessionStore, prefix: str) -> None:
        self._store, self._prefix = store, prefix

    def _key(self, key: dict) -> dict:
        return {**key, "project_key": self._prefix + key["project_key"]}

    async def append(self, key: dict, entries: list) -> None:
        await self._store.append(self._key(key), entries)

    async def load(self, key: dict) -> list | None:
        return await self._store.load(self._key(key))

    async def list_sessions(self, project_key: str) -> list:
        return await self._store.list_sessions(self._prefix + project_key)

    async def delete(self, key: dict) -> None:
        await self._store.delete(self._key(key))

    async def list_subkeys(self, key: dict) -> list:
        return await self._store.list_subkeys(self._key(key))


async def test_appends_with_a_known_uuid_are_idempotent(
    db: async_sessionmaker[AsyncSession],
) -> None:
    store = SqlSessionStore(db)
    key = {"project_key": "idem", "session_id": "s"}
    entry = {"type": "user", "uuid": "u1", "n": 1}
    await store.append(key, [entry, {"type": "title", "t": "x"}])
    await store.append(key, [entry, {"type": "user", "uuid": "u2"}])  # a re-sent batch
    assert await store.load(key) == [
        entry,
        {"type": "title", "t": "x"},
        {"type": "user", "uuid": "u2"},
    ]


async def test_a_session_resumes_an_earlier_conversation_on_another_server(
    harness: Harness,
) -> None:
    memory = Script(
        steps=[
            Step(
                text="Noted: the fruit is KIWI.", usage=Usage(input_tokens=1000, output_tokens=20)
            ),
            Step(text="You told me KIWI.", usage=Usage(input_tokens=2000, output_tokens=10)),
        ]
    )
    harness.sandbox.add_script("memory", memory)
    first = await harness.run(prompt="[[sandbox:memory]] Remember the fruit KIWI.")
    earlier = first[-1].result.session
    assert earlier.state == session_pb2.SESSION_STATE_COMPLETE
    assert not list(harness.work_dir.glob("w/acme/*"))  # its local files are gone

    other = await start_harness(harness.database_url)  # a second replica, same database
    other.sandbox.add_script("memory", memory)
    try:
        events = await other.run(prompt="Which fruit did I name?", resume_session_id=earlier.id)
        asked = other.sandbox.requests[-1].body
    finally:
        await stop_harness(other)

    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert final.id != earlier.id and final.resume_session_id == earlier.id
    assert final.result == "You told me KIWI."
    assert final.sdk_session_id == earlier.sdk_session_id
    # The model saw the whole conversation, restored from the database.
    history = str(asked["messages"])
    assert "Remember the fruit KIWI" in history and "Noted: the fruit is KIWI." in history
    assert "Which fruit did I name?" in history
    # Each session pays for its own turn only (sonnet: $3 / $15 per Mtok).
    assert Decimal(earlier.cost_usd) == Decimal("0.003300")
    assert Decimal(final.cost_usd) == Decimal("0.006150")


async def test_resume_errors(harness: Harness) -> None:
    first = await harness.run(prompt="hello there")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run("globex", prompt="again", resume_session_id=first[0].session_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run(prompt="again", resume_session_id="not-a-uuid")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    harness.sandbox.add_script("long", Script(steps=[Step(text="later", delay_s=2)]))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:long]] x", model="claude-sonnet-4-5"),
        metadata=harness.auth(),
    )
    running = await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.run(prompt="again", resume_session_id=running.session_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has not ended" in caught.value.details()
    while await call.read() is not grpc.aio.EOF:
        pass
