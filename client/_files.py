"""Files in, artifacts out, and structured results, as Python values.

A RunSession may carry ``input_files`` (written into the session's workspace before the
agent starts) and an ``output_schema_json`` (the session's result must match it; the
finished Session carries ``structured_result_json``). After the end, ``ListArtifacts``
lists the files the session created or changed and ``GetArtifact`` streams one in chunks.
Both clients share this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from ._errors import AgentplaneError, ArtifactError, SessionFailed
from .v1 import session_pb2

FileContent: TypeAlias = bytes | bytearray | memoryview | str
InputFilesLike: TypeAlias = (
    Mapping[str, FileContent] | Sequence[tuple[str, FileContent] | session_pb2.InputFile]
)
SchemaLike: TypeAlias = Mapping[str, Any] | str
Destination: TypeAlias = str | os.PathLike[str]  # a file, or a directory to put one in


def output_schema_json(schema: SchemaLike | None) -> str:
    """A JSON Schema (a dict, or its JSON text, sent as it is) as the request field ("" for
    None). The server checks it: an invalid one is INVALID_ARGUMENT on
    ``output_schema_json``."""
    if schema is None:
        return ""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, Mapping):
        return json.dumps(dict(schema), ensure_ascii=False)
    raise TypeError(f"output_schema must be a dict or a JSON string, not {type(schema)!r}")


def _content(path: str, value: FileContent) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"input file {path!r}: content must be bytes or str, not {type(value)!r}")


def input_files(files: InputFilesLike | None) -> list[session_pb2.InputFile]:
    """InputFiles for ``{path: content}``, ``[(path, content), ...]`` or InputFiles (a str
    content is sent as UTF-8). Paths are relative to the workspace; the server refuses bad
    ones (absolute, ``..``, repeated) as INVALID_ARGUMENT naming ``input_files[i].path``."""
    if files is None:
        return []
    if isinstance(files, str | bytes):
        raise TypeError("input_files must be a mapping or a sequence of (path, content)")
    items: Iterable[Any] = files.items() if isinstance(files, Mapping) else files
    found = []
    for item in items:
        if isinstance(item, session_pb2.InputFile):
            found.append(item)
            continue
        path, content = item
        path = os.fspath(path)
        found.append(session_pb2.InputFile(path=path, content=_content(path, content)))
    return found


def structured_result(session: session_pb2.Session) -> Any:
    """The session's structured result, parsed from ``structured_result_json`` (None when
    it has none: no output schema, or the session did not complete)."""
    if not session.structured_result_json:
        return None
    return json.loads(session.structured_result_json)


def result_of(session: session_pb2.Session | None) -> Any:
    """The structured result of a finished session (None: the stream ended without one);
    :class:`SessionFailed` if it ended ERROR."""
    if session is None:
        raise AgentplaneError("the session's event stream ended without a result")
    if session.state == session_pb2.SESSION_STATE_ERROR:
        raise SessionFailed(session)
    return structured_result(session)


class ArtifactAssembler:
    """Puts one artifact's chunks back together, checking them: the first carries the
    artifact, each starts where the last ended, and the whole has the artifact's size and
    SHA-256."""

    def __init__(self, session_id: str, path: str) -> None:
        self.session_id = session_id
        self.path = path
        self.artifact: session_pb2.Artifact | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def _fail(self, problem: str) -> ArtifactError:
        return ArtifactError(self.session_id, self.path, problem)

    def add(self, chunk: session_pb2.ArtifactChunk) -> None:
        """Take the next chunk."""
        if self.artifact is None:
            if not chunk.HasField("artifact"):
                raise self._fail("the first chunk does not describe the artifact")
            self.artifact = chunk.artifact
        if chunk.offset != self._size:
            raise self._fail(f"a chunk at offset {chunk.offset}, expected {self._size}")
        self._parts.append(chunk.data)
        self._size += len(chunk.data)

    def content(self) -> bytes:
        """The whole artifact, once every chunk was added."""
        if self.artifact is None:
            raise self._fail("the stream ended without a chunk")
        data = b"".join(self._parts)
        if len(data) != self.artifact.size_bytes:
            raise self._fail(f"{len(data)} bytes received of {self.artifact.size_bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if self.artifact.sha256 and digest != self.artifact.sha256.lower():
            raise self._fail(f"SHA-256 {digest}, expected {self.artifact.sha256}")
        return data


def destination(dest: Destination, artifact_path: str) -> Path:
    """Where a download goes: ``dest``, or inside it when it is a directory (under the
    artifact's file name)."""
    target = Path(dest)
    return target / Path(artifact_path).name if target.is_dir() else target


def write_file(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically: a new file beside it (mode 0666 less the
    umask, as ``open`` makes), renamed over it."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target
