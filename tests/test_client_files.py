"""The Python client's files in, structured results and artifacts out, and deletion (sync
and asyncio) against the real server; the chunk checks of get_artifact on their own."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentplane import (
    AgentplaneError,
    ArtifactError,
    AsyncClient,
    Client,
    RPCError,
    SessionFailed,
    structured_result,
)
from agentplane._files import ArtifactAssembler, input_files, output_schema_json
from agentplane.server.model_double.script import Script, Step, ToolCall
from agentplane.v1 import session_pb2
from harness import MODEL, TOKENS, Harness

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "files": {"type": "array"}},
    "required": ["answer"],
}
# Three chunks of GetArtifact (64 KiB each), within the `files` tenant's 1 MiB per file.
BLOB = random.Random(16).randbytes(150 * 1024)


def target(h: Harness) -> str:
    return f"127.0.0.1:{h.app.port}"


def bash(command: str) -> Step:
    return Step(tool_calls=[ToolCall("Bash", {"command": command})])


def answer(value: dict[str, Any]) -> Step:
    return Step(tool_calls=[ToolCall("StructuredOutput", value)])


def files_script(h: Harness, name: str) -> str:
    """Copies the input files into new ones (artifacts), then answers structured; the
    prompt that runs it."""
    h.sandbox.add_script(
        name,
        Script(
            steps=[
                bash("mkdir -p out && cp blob.bin out/copy.bin && cat docs/in.txt > echo.txt"),
                answer({"answer": 7, "files": ["out/copy.bin", "echo.txt"]}),
                Step(text="done"),
            ]
        ),
    )
    return f"[[sandbox:{name}]] copy the files"


async def test_the_sync_client_sends_files_and_gets_the_result_and_artifacts(
    harness: Harness, tmp_path: Path
) -> None:
    prompt = files_script(harness, "client_files_sync")

    def work() -> dict[str, Any]:
        got: dict[str, Any] = {}
        with Client(target(harness), token=TOKENS["files"], timeout=30) as client:
            got["result"] = client.run_for_result(
                prompt,
                SCHEMA,
                model=MODEL,
                labels={"via": "sync-files"},
                input_files={"docs/in.txt": "héllo\n", "blob.bin": BLOB},
            )
            session = client.list_sessions(labels={"via": "sync-files"}).sessions[0]
            got["session"] = session
            got["artifacts"] = {a.path: a for a in client.list_artifacts(session.id)}
            got["copy"] = client.get_artifact(session.id, "out/copy.bin")
            got["into_dir"] = client.download_artifact(session.id, "echo.txt", tmp_path)
            got["as_file"] = client.download_artifact(
                session.id, "out/copy.bin", tmp_path / "renamed.bin"
            )
            with pytest.raises(RPCError) as missing:
                client.get_artifact(session.id, "docs/in.txt")  # unchanged: not an artifact
            got["missing"] = missing.value
            client.delete_session(session.id)
            with pytest.raises(RPCError) as gone:
                client.get_session(session.id)
            got["gone"] = gone.value
            with pytest.raises(RPCError) as gone_artifacts:
                client.list_artifacts(session.id)
            got["gone_artifacts"] = gone_artifacts.value
        return got

    got = await asyncio.to_thread(work)

    assert got["result"] == {"answer": 7, "files": ["out/copy.bin", "echo.txt"]}
    session = got["session"]
    assert session.state == session_pb2.SESSION_STATE_COMPLETE
    assert structured_result(session) == got["result"]
    assert json.loads(session.output_schema_json) == SCHEMA
    artifacts = got["artifacts"]
    assert set(artifacts) == {"out/copy.bin", "echo.txt"}
    assert artifacts["out/copy.bin"].size_bytes == len(BLOB)
    assert artifacts["out/copy.bin"].sha256 == hashlib.sha256(BLOB).hexdigest()
    assert got["copy"] == BLOB
    assert got["into_dir"] == tmp_path / "echo.txt"
    assert (tmp_path / "echo.txt").read_bytes() == "héllo\n".encode()
    assert got["as_file"] == tmp_path / "renamed.bin" and got["as_file"].read_bytes() == BLOB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["echo.txt", "renamed.bin"]  # no temp
    assert got["missing"].code == grpc.StatusCode.NOT_FOUND
    assert got["gone"].code == grpc.StatusCode.NOT_FOUND
    assert got["gone_artifacts"].code == grpc.StatusCode.NOT_FOUND


async def test_the_sync_client_raises_session_failed_for_an_invalid_output(
    harness: Harness,
) -> None:
    harness.sandbox.add_script("client_prose_sync", Script(steps=[Step(text="just prose")]))

    def work() -> SessionFailed:
        with Client(target(harness), token=TOKENS["files"], timeout=30) as client:
            with pytest.raises(SessionFailed) as caught:
                client.run_for_result("[[sandbox:client_prose_sync]] go", SCHEMA, model=MODEL)
            return caught.value

    failed = await asyncio.to_thread(work)

    assert isinstance(failed, AgentplaneError) and not isinstance(failed, RPCError)
    assert failed.reason == "INVALID_OUTPUT"
    assert failed.session.state == session_pb2.SESSION_STATE_ERROR
    assert failed.session.error.reason == session_pb2.ERROR_REASON_INVALID_OUTPUT
    assert "no structured result" in failed.message
    assert str(failed).startswith(f"session {failed.session.id} failed: INVALID_OUTPUT: ")
    assert structured_result(failed.session) is None


async def test_the_async_client_sends_files_and_gets_the_result_and_artifacts(
    harness: Harness, tmp_path: Path
) -> None:
    prompt = files_script(harness, "client_files_async")
    async with AsyncClient(target(harness), token=TOKENS["files"], timeout=30) as client:
        events = [
            e
            async for e in client.run(
                prompt,
                model=MODEL,
                output_schema=json.dumps(SCHEMA),
                input_files=[("docs/in.txt", b"bytes\n"), ("blob.bin", BLOB)],
            )
        ]
        final = events[-1].result.session
        assert final.state == session_pb2.SESSION_STATE_COMPLETE, final.error
        assert structured_result(final) == {"answer": 7, "files": ["out/copy.bin", "echo.txt"]}

        listed = await client.list_artifacts(final.id)
        assert [a.path for a in listed] == sorted(a.path for a in listed)
        assert {a.path: a.size_bytes for a in listed} == {"out/copy.bin": len(BLOB), "echo.txt": 6}
        assert await client.get_artifact(final.id, "out/copy.bin") == BLOB
        written = await client.download_artifact(final.id, "echo.txt", tmp_path / "e.txt")
        assert written.read_bytes() == b"bytes\n"

        await client.delete_session(final.id)
        with pytest.raises(RPCError) as caught:
            await client.get_session(final.id)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RPCError) as caught:
            await client.delete_session(final.id)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_the_async_client_result_failure_left_out_files_and_a_running_delete(
    harness: Harness, tmp_path: Path
) -> None:
    harness.sandbox.add_script(
        "client_prose_async",
        Script(
            steps=[
                bash("head -c 1100000 /dev/zero > big.bin && echo kept > small.txt"),
                Step(text="no structure"),
            ]
        ),
    )
    harness.sandbox.add_script("client_hold", Script(steps=[Step(hang=True)]))
    async with AsyncClient(target(harness), token=TOKENS["files"], timeout=30) as client:
        with pytest.raises(SessionFailed) as caught:
            await client.run_for_result("[[sandbox:client_prose_async]] go", SCHEMA, model=MODEL)
        failed = caught.value.session
        assert caught.value.reason == "INVALID_OUTPUT" and failed.id

        # Its files are kept all the same; the one over the limit is listed, not served.
        listed = {a.path: a for a in await client.list_artifacts(failed.id)}
        assert set(listed) == {"big.bin", "small.txt"}
        assert listed["big.bin"].omitted_reason.startswith("larger than")
        assert not listed["big.bin"].sha256
        assert await client.get_artifact(failed.id, "small.txt") == b"kept\n"
        with pytest.raises(RPCError) as refused:
            await client.download_artifact(failed.id, "big.bin", tmp_path)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert not list(tmp_path.iterdir())  # nothing written

        stream = client.run("[[sandbox:client_hold]] wait", model=MODEL)
        session_id = (await anext(stream)).session_id
        with pytest.raises(RPCError) as running:
            await client.delete_session(session_id)
        assert running.value.code == grpc.StatusCode.FAILED_PRECONDITION
        await client.cancel_session(session_id)
        async for _ in stream:
            pass
        await client.delete_session(session_id)  # ended now


async def test_a_bad_schema_or_input_file_is_refused_naming_the_field(harness: Harness) -> None:
    async with AsyncClient(target(harness), token=TOKENS["files"]) as client:
        with pytest.raises(RPCError) as caught:
            await client.run_for_result("hi", '{"type": "array"}', model=MODEL)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in caught.value.field_violations] == ["output_schema_json"]
        with pytest.raises(RPCError) as caught:
            async for _ in client.run("hi", model=MODEL, input_files={"../up.txt": "x"}):
                pass
        assert [v.field for v in caught.value.field_violations] == ["input_files[0].path"]


# -- the pieces, on their own -----------------------------------------------------------


def chunk(
    data: bytes, offset: int, artifact: session_pb2.Artifact | None = None
) -> session_pb2.ArtifactChunk:
    message = session_pb2.ArtifactChunk(data=data, offset=offset)
    if artifact is not None:
        message.artifact.CopyFrom(artifact)
    return message


def described(data: bytes) -> session_pb2.Artifact:
    return session_pb2.Artifact(
        path="a.bin", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def assemble(*chunks: session_pb2.ArtifactChunk) -> bytes:
    assembler = ArtifactAssembler("s-1", "a.bin")
    for c in chunks:
        assembler.add(c)
    return assembler.content()


def test_chunks_are_put_together_and_checked() -> None:
    data = b"0123456789"
    assert assemble(chunk(data[:4], 0, described(data)), chunk(data[4:], 4)) == data
    assert assemble(chunk(b"", 0, described(b""))) == b""  # an empty file: one empty chunk

    problems = {
        "the first chunk does not describe": [chunk(data, 0)],
        "a chunk at offset 5, expected 4": [
            chunk(data[:4], 0, described(data)),
            chunk(data[5:], 5),
        ],
        "9 bytes received of 10": [chunk(data[:9], 0, described(data))],
        "SHA-256 ": [
            chunk(
                data,
                0,
                session_pb2.Artifact(
                    path="a.bin", size_bytes=10, sha256=hashlib.sha256(b"other").hexdigest()
                ),
            )
        ],
        "the stream ended without a chunk": [],
    }
    for problem, chunks in problems.items():
        with pytest.raises(ArtifactError) as caught:
            assemble(*chunks)
        assert problem in str(caught.value), problem
        assert isinstance(caught.value, AgentplaneError)
        assert caught.value.path == "a.bin" and caught.value.session_id == "s-1"


def test_input_files_and_schemas_become_request_fields() -> None:
    files = input_files({"a.txt": "é", "b.bin": b"\x00\xff", Path("c/d"): bytearray(b"x")})  # type: ignore[dict-item]
    assert [(f.path, f.content) for f in files] == [
        ("a.txt", "é".encode()),
        ("b.bin", b"\x00\xff"),
        (os.fspath(Path("c/d")), b"x"),
    ]
    proto = session_pb2.InputFile(path="p", content=b"q")
    assert input_files([("x", "y"), proto]) == [
        session_pb2.InputFile(path="x", content=b"y"),
        proto,
    ]
    assert input_files(None) == []
    with pytest.raises(TypeError):
        input_files({"a": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        input_files("a.txt")  # type: ignore[arg-type]

    assert json.loads(output_schema_json(SCHEMA)) == SCHEMA
    assert output_schema_json('{"type":"object"}') == '{"type":"object"}'  # sent as it is
    assert output_schema_json(None) == ""
    with pytest.raises(TypeError):
        output_schema_json(["not", "a", "schema"])  # type: ignore[arg-type]
