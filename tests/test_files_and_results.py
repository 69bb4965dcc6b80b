"""Structured results, files in, artifacts out, and deletion, against the real CLI."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy
from agentplane.server.domain import utcnow
from agentplane.server.model_double import Script, Step, ToolCall
from agentplane.v1 import budget_pb2, session_pb2
from harness import (
    MODEL,
    Harness,
    error_details,
    short_dir,
    start_harness,
    stop_harness,
    tenant_toml,
)

pytestmark = pytest.mark.asyncio

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
    "required": ["answer"],
}


async def run(
    h: Harness, script: str, steps: list[Step], tenant: str = "files", **fields: Any
) -> list[session_pb2.SessionEvent]:
    h.sandbox.add_script(script, Script(steps=steps))
    fields.setdefault("model", MODEL)
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", **fields),
        metadata=h.auth(tenant),
    )
    return [event async for event in call]


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def bash(command: str) -> Step:
    return Step(tool_calls=[ToolCall("Bash", {"command": command})])


async def artifacts(h: Harness, session_id: str, tenant: str = "files") -> dict[str, Any]:
    listed = await h.sessions.ListArtifacts(
        session_pb2.ListArtifactsRequest(session_id=session_id), metadata=h.auth(tenant)
    )
    return {a.path: a for a in listed.artifacts}


async def download(h: Harness, session_id: str, path: str, tenant: str = "files") -> bytes:
    call = h.sessions.GetArtifact(
        session_pb2.GetArtifactRequest(session_id=session_id, path=path), metadata=h.auth(tenant)
    )
    chunks = [chunk async for chunk in call]
    assert chunks[0].artifact.path == path
    assert [c.offset for c in chunks] == [
        sum(len(p.data) for p in chunks[:i]) for i in range(len(chunks))
    ]
    return b"".join(c.data for c in chunks)


async def test_a_structured_result_that_matches_its_schema(harness: Harness) -> None:
    events = await run(
        harness,
        "structured",
        [
            Step(tool_calls=[ToolCall("StructuredOutput", {"answer": 42, "why": "because"})]),
            Step(text="done"),
        ],
        output_schema_json=json.dumps(SCHEMA),
    )
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert json.loads(final.structured_result_json) == {"answer": 42, "why": "because"}
    assert json.loads(final.output_schema_json) == SCHEMA
    stored = await harness.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=final.id), metadata=harness.auth("files")
    )
    assert stored.structured_result_json == final.structured_result_json


async def test_no_structured_result_ends_the_session_invalid_output(harness: Harness) -> None:
    events = await run(
        harness, "unstructured", [Step(text="just prose")], output_schema_json=json.dumps(SCHEMA)
    )
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_INVALID_OUTPUT
    assert "no structured result" in final.error.message and not final.structured_result_json


@pytest.mark.parametrize(
    "schema",
    [
        "{not json",
        '{"type": "array"}',
        '{"type": "object", "properties": {"a": {"type": 7}}}',
    ],
)
async def test_a_bad_output_schema_is_invalid_argument(harness: Harness, schema: str) -> None:
    err = await refused(
        harness.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt="hi", model=MODEL, output_schema_json=schema),
            metadata=harness.auth("files"),
        ).read()
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_details(err)["BadRequest"].field_violations] == [
        "output_schema_json"
    ]


async def test_files_in_and_artifacts_out(harness: Harness) -> None:
    events = await run(
        harness,
        "files_round_trip",
        [
            bash("cat docs/spec.md"),
            bash(
                "mkdir -p out && echo made > out/result.txt && echo changed >> docs/spec.md"
                " && head -c 1100000 /dev/zero > big.bin && ln -s /etc/passwd link"
            ),
            Step(text="done"),
        ],
        input_files=[
            session_pb2.InputFile(path="docs/spec.md", content=b"SPEC-123\n"),
            session_pb2.InputFile(path="untouched.txt", content=b"same"),
        ],
    )
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert results[0].content.strip() == "SPEC-123"
    session_id = events[0].session_id
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE

    found = await artifacts(harness, session_id)
    assert set(found) == {"docs/spec.md", "out/result.txt", "big.bin", "link"}  # not untouched
    assert found["big.bin"].omitted_reason.startswith("larger than")
    assert found["link"].omitted_reason == "symlink"
    assert await download(harness, session_id, "out/result.txt") == b"made\n"
    assert await download(harness, session_id, "docs/spec.md") == b"SPEC-123\nchanged\n"
    assert found["out/result.txt"].size_bytes == 5 and len(found["out/result.txt"].sha256) == 64

    err = await refused(download(harness, session_id, "big.bin"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = await refused(download(harness, session_id, "nope.txt"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(artifacts(harness, session_id, tenant="ops"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(download(harness, session_id, "out/result.txt", tenant="ops"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("files", "field"),
    [
        ([("/etc/passwd", b"")], "input_files[0].path"),
        ([("a/../../x", b"")], "input_files[0].path"),
        ([("a//b", b"")], "input_files[0].path"),
        ([("", b"")], "input_files[0].path"),
        ([("a.txt", b""), ("a.txt", b"")], "input_files[1].path"),
        ([("a", b""), ("a/b", b"")], "input_files[1].path"),
        ([("big", b"x" * ((1 << 20) + 1))], "input_files[0].path"),
        ([(f"f{i}", b"") for i in range(4)], "input_files"),
        ([("a", b"x" * (1 << 20)), ("b", b"x" * (1 << 20)), ("c", b"x")], "input_files"),
    ],
)
async def test_bad_input_files_are_invalid_argument_naming_the_file(
    harness: Harness, files: list[tuple[str, bytes]], field: str
) -> None:
    err = await refused(
        harness.sessions.RunSession(
            session_pb2.RunSessionRequest(
                prompt="hi",
                model=MODEL,
                input_files=[session_pb2.InputFile(path=p, content=c) for p, c in files],
            ),
            metadata=harness.auth("files"),
        ).read()
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert [v.field for v in error_details(err)["BadRequest"].field_violations] == [field]


async def test_an_input_file_through_a_template_symlink_is_refused(database_url: str) -> None:
    template = short_dir("tpl")
    (template / "escape").symlink_to("/tmp")
    token = "linked-token-9"
    h = await start_harness(
        database_url,
        extra_tenants=tenant_toml(
            "linked",
            token,
            anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
            allowed_tools=["Read"],
            workspace_template=template,
        ),
    )
    try:
        err = await refused(
            h.sessions.RunSession(
                session_pb2.RunSessionRequest(
                    prompt="hi",
                    model=MODEL,
                    input_files=[session_pb2.InputFile(path="escape/planted", content=b"x")],
                ),
                metadata=[("authorization", f"Bearer {token}")],
            ).read()
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "symlink" in err.details()
        assert not Path("/tmp/planted").exists()
    finally:
        await stop_harness(h)


async def rows_of(h: Harness, session_id: str) -> dict[str, int]:
    """How many rows of each table name the session."""
    counts = {}
    async with h.app.engine.connect() as conn:
        for table, column in (
            ("sessions", "id"),
            ("session_events", "session_id"),
            ("session_labels", "session_id"),
            ("tool_uses", "session_id"),
            ("model_requests", "session_id"),
            ("model_requests_in_flight", "session_id"),
            ("session_inputs", "session_id"),
            ("session_artifacts", "session_id"),
            ("reservations", "session_id"),
        ):
            counts[table] = (
                await conn.execute(
                    sqlalchemy.text(f"SELECT count(*) FROM {table} WHERE {column} = :id"),
                    {"id": session_id},
                )
            ).scalar_one()
    return counts


async def transcript_rows(h: Harness, conversation: str) -> int:
    async with h.app.engine.connect() as conn:
        return (
            await conn.execute(
                sqlalchemy.text("SELECT count(*) FROM transcript_entries WHERE session_id = :id"),
                {"id": conversation},
            )
        ).scalar_one()


async def test_delete_session_leaves_no_row_and_keeps_the_spend(harness: Harness) -> None:
    events = await run(
        harness,
        "to_delete",
        [bash("echo x > kept.txt"), Step(text="done")],
        labels={"team": "gone"},
    )
    final = events[-1].result.session
    before = await harness.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(), metadata=harness.auth("files")
    )
    assert (await rows_of(harness, final.id))["session_artifacts"] == 1
    assert await transcript_rows(harness, final.sdk_session_id) > 0

    err = await refused(
        harness.sessions.DeleteSession(
            session_pb2.DeleteSessionRequest(session_id=final.id), metadata=harness.auth("ops")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    await harness.sessions.GetSession(  # cached in memory, as ended sessions are
        session_pb2.GetSessionRequest(session_id=final.id), metadata=harness.auth("files")
    )
    deleted = await harness.sessions.DeleteSession(
        session_pb2.DeleteSessionRequest(session_id=final.id), metadata=harness.auth("files")
    )
    assert deleted.session_id == final.id

    assert set((await rows_of(harness, final.id)).values()) == {0}
    assert not [p for p in harness.work_dir.rglob("*") if final.id in p.name]  # no file either
    assert await transcript_rows(harness, final.sdk_session_id) == 0
    err = await refused(
        harness.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=final.id), metadata=harness.auth("files")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(
        harness.sessions.DeleteSession(
            session_pb2.DeleteSessionRequest(session_id=final.id), metadata=harness.auth("files")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    after = await harness.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(), metadata=harness.auth("files")
    )
    assert Decimal(after.spent_usd) == Decimal(before.spent_usd) > 0


async def test_a_running_session_cannot_be_deleted(harness: Harness) -> None:
    harness.sandbox.add_script("hold_for_delete", Script(steps=[Step(hang=True)]))
    call = harness.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt="[[sandbox:hold_for_delete]] wait", model=MODEL),
        metadata=harness.auth("files"),
    )
    session_id = (await call.read()).session_id
    err = await refused(
        harness.sessions.DeleteSession(
            session_pb2.DeleteSessionRequest(session_id=session_id), metadata=harness.auth("files")
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    await harness.sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=session_id), metadata=harness.auth("files")
    )
    while await call.read() is not grpc.aio.EOF:
        pass
    assert (await rows_of(harness, session_id))["sessions"] == 1


async def test_retention_deletes_sessions_older_than_the_tenants_days(harness: Harness) -> None:
    old = (await run(harness, "old_one", [Step(text="old")]))[-1].result.session
    new = (await run(harness, "new_one", [Step(text="new")]))[-1].result.session
    kept = (await run(harness, "other_tenant", [Step(text="x")], tenant="ops"))[-1].result.session
    async with harness.app.engine.begin() as conn:  # as if they ended two days ago
        for session_id in (old.id, kept.id):
            await conn.execute(
                sqlalchemy.text("UPDATE sessions SET ended_at = :at WHERE id = :id"),
                {"at": utcnow() - timedelta(days=2), "id": session_id},
            )
    deleted = await harness.app.sessions.deleter.sweep(harness.app.tenants.tenants.values())
    assert deleted == 1  # `files` keeps sessions a day; `ops` keeps them for ever
    assert (await rows_of(harness, old.id))["sessions"] == 0
    assert (await rows_of(harness, new.id))["sessions"] == 1
    assert (await rows_of(harness, kept.id))["sessions"] == 1


async def test_artifacts_and_deletion_from_another_replica(replicas: Any) -> None:
    owner, other = replicas
    events = await run(owner, "elsewhere_files", [bash("echo far > far.txt"), Step(text="done")])
    session_id = events[0].session_id
    assert await download(other, session_id, "far.txt") == b"far\n"
    assert set(await artifacts(other, session_id)) == {"far.txt"}
    await owner.sessions.GetSession(  # now in the owner's memory
        session_pb2.GetSessionRequest(session_id=session_id), metadata=owner.auth("files")
    )
    await other.sessions.DeleteSession(
        session_pb2.DeleteSessionRequest(session_id=session_id), metadata=other.auth("files")
    )
    err = await refused(
        other.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=session_id), metadata=other.auth("files")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    for _ in range(1200):  # the owner forgets it once the deletion's NOTIFY arrives
        try:
            await owner.sessions.GetSession(
                session_pb2.GetSessionRequest(session_id=session_id), metadata=owner.auth("files")
            )
        except grpc.aio.AioRpcError as gone:
            assert gone.code() == grpc.StatusCode.NOT_FOUND
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the owner still answers a deleted session from memory")


async def test_a_structured_result_with_the_caller_in_the_loop(harness: Harness) -> None:
    # The caller's hook and prompt answers must let the CLI's StructuredOutput tool through.
    events = await run(
        harness,
        "structured_loop",
        [
            Step(tool_calls=[ToolCall("StructuredOutput", {"answer": 7})]),
            Step(text="done"),
        ],
        tenant="loop",
        output_schema_json=json.dumps(SCHEMA),
        require_approval=["Bash"],
    )
    final = events[-1].result.session
    assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
    assert json.loads(final.structured_result_json) == {"answer": 7}
