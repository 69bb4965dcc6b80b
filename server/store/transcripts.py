"""The Claude Agent SDK's SessionStore, on agentplane's database.

The CLI still writes its transcript under the session's CLAUDE_CONFIG_DIR; the SDK
mirrors every entry here, and a `resume` on any replica materialises the transcript from
here, so a conversation survives the loss of the server that held its local files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from .models import TranscriptEntryRow, TranscriptRow, table

Key = dict[str, Any]  # claude_agent_sdk.types.SessionKey: project_key, session_id[, subpath]


def _parts(key: Key) -> tuple[str, str, str]:
    return key["project_key"], key["session_id"], key.get("subpath") or ""


class SqlSessionStore:
    """SessionStore (append, load, list_sessions, delete, list_subkeys) over SQLAlchemy.

    Entries with a `uuid` are idempotent: a batch re-sent after a timeout adds nothing.
    """

    def __init__(self, db: async_sessionmaker[DbSession]) -> None:
        self._db = db

    async def append(self, key: Key, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        project, session, subpath = _parts(key)
        where = (
            TranscriptEntryRow.project_key == project,
            TranscriptEntryRow.session_id == session,
            TranscriptEntryRow.subpath == subpath,
        )
        async with self._db.begin() as db:
            uuids = [e["uuid"] for e in entries if isinstance(e.get("uuid"), str)]
            seen = set()
            if uuids:
                seen = set(
                    await db.scalars(
                        select(TranscriptEntryRow.uuid).where(
                            *where, TranscriptEntryRow.uuid.in_(uuids)
                        )
                    )
                )
            rows = []
            for entry in entries:
                uuid = entry.get("uuid") if isinstance(entry.get("uuid"), str) else None
                if uuid is not None:
                    if uuid in seen:
                        continue
                    seen.add(uuid)
                rows.append(
                    {
                        "project_key": project,
                        "session_id": session,
                        "subpath": subpath,
                        "uuid": uuid,
                        "entry": entry,
                    }
                )
            if rows:
                await db.execute(insert(table(TranscriptEntryRow)), rows)
            await self._touch(db, project, session, subpath)

    @staticmethod
    async def _touch(db: DbSession, project: str, session: str, subpath: str) -> None:
        dialect = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
        now_ms = int(time.time() * 1000)
        stmt = dialect.insert(TranscriptRow).values(
            project_key=project, session_id=session, subpath=subpath, mtime_ms=now_ms
        )
        await db.execute(
            stmt.on_conflict_do_update(
                index_elements=["project_key", "session_id", "subpath"], set_={"mtime_ms": now_ms}
            )
        )

    async def load(self, key: Key) -> list[dict[str, Any]] | None:
        project, session, subpath = _parts(key)
        async with self._db() as db:
            known = await db.get(TranscriptRow, (project, session, subpath))
            if known is None:
                return None
            rows = await db.scalars(
                select(TranscriptEntryRow.entry)
                .where(
                    TranscriptEntryRow.project_key == project,
                    TranscriptEntryRow.session_id == session,
                    TranscriptEntryRow.subpath == subpath,
                )
                .order_by(TranscriptEntryRow.id)
            )
            return list(rows)

    async def list_sessions(self, project_key: str) -> list[dict[str, Any]]:
        async with self._db() as db:
            rows = await db.execute(
                select(TranscriptRow.session_id, TranscriptRow.mtime_ms).where(
                    TranscriptRow.project_key == project_key, TranscriptRow.subpath == ""
                )
            )
            return [{"session_id": sid, "mtime": mtime} for sid, mtime in rows]

    async def delete(self, key: Key) -> None:
        project, session, subpath = _parts(key)
        async with self._db.begin() as db:
            for model in (TranscriptEntryRow, TranscriptRow):
                stmt = delete(model).where(
                    model.project_key == project, model.session_id == session
                )
                if subpath:  # a main-transcript delete cascades to every subpath
                    stmt = stmt.where(model.subpath == subpath)
                await db.execute(stmt)

    async def list_subkeys(self, key: Key) -> list[str]:
        async with self._db() as db:
            rows = await db.scalars(
                select(TranscriptRow.subpath).where(
                    TranscriptRow.project_key == key["project_key"],
                    TranscriptRow.session_id == key["session_id"],
                    TranscriptRow.subpath != "",
                )
            )
            return list(rows)


def project_key(tenant: str) -> str:
    """The project_key of every transcript of `tenant` (see TenantTranscripts)."""
    return f"tenant:{tenant}"


class TenantTranscripts:
    """A SessionStore view confined to one tenant.

    The SDK derives a transcript's project_key from the session's cwd, and every
    agentplane session has its own cwd; scoping by tenant instead lets a new session
    (on any replica) resume an earlier one of the same tenant, and never another's.
    """

    def __init__(self, store: SqlSessionStore, tenant: str) -> None:
        self._store = store
        self._project = project_key(tenant)

    def _key(self, key: Key) -> Key:
        return {**key, "project_key": self._project}

    async def append(self, key: Key, entries: list[dict[str, Any]]) -> None:
        await self._store.append(self._key(key), entries)

    async def load(self, key: Key) -> list[dict[str, Any]] | None:
        return await self._store.load(self._key(key))

    async def list_sessions(self, project_key: str) -> list[dict[str, Any]]:
        return await self._store.list_sessions(self._project)

    async def delete(self, key: Key) -> None:
        await self._store.delete(self._key(key))

    async def list_subkeys(self, key: Key) -> list[str]:
        return await self._store.list_subkeys(self._key(key))

    async def has(self, session_id: str) -> bool:
        """Whether a conversation with this SDK session id was mirrored."""
        return await self.load({"project_key": self._project, "session_id": session_id}) is not None


class ChargedTranscripts(TenantTranscripts):
    """A tenant's transcripts as one session's CLI mirrors them.

    The SDK stores whatever `transcript_mirror` frame the CLI's stdout holds, and a tool
    can write forged ones there (for any conversation): so each append is charged to the
    session first, and one that `charge(bytes)` refuses is dropped. (Dropped, not raised:
    the SDK retries a failed append with a pause, once per conversation a frame names, and
    a closing CLI waits for all of that. The session is stopped at its limit meanwhile.)
    """

    def __init__(self, store: SqlSessionStore, tenant: str, charge: Callable[[int], bool]) -> None:
        super().__init__(store, tenant)
        self._charge = charge

    async def append(self, key: Key, entries: list[dict[str, Any]]) -> None:
        size = sum(len(json.dumps(entry)) for entry in entries)
        if not self._charge(size):
            return
        try:
            await super().append(key, entries)
        except BaseException:
            self._charge(-size)  # not stored after all
            raise
