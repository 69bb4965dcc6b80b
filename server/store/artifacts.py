"""Repository of sessions' artifacts (the files they created or changed in their
workspace). Functions take an AsyncSession and never commit."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from ..domain import Artifact
from .models import ArtifactRow, table


async def insert_artifacts(db: DbSession, session_id: str, artifacts: Sequence[Artifact]) -> None:
    if not artifacts:
        return
    await db.execute(
        insert(table(ArtifactRow)),
        [
            {
                "session_id": session_id,
                "path": a.path,
                "size": a.size,
                "sha256": a.sha256,
                "content": a.content,
                "omitted_reason": a.omitted_reason,
            }
            for a in artifacts
        ],
    )


async def list_artifacts(db: DbSession, session_id: str) -> list[Artifact]:
    """The session's artifacts by path, without their content."""
    rows = await db.execute(
        select(ArtifactRow.path, ArtifactRow.size, ArtifactRow.sha256, ArtifactRow.omitted_reason)
        .where(ArtifactRow.session_id == session_id)
        .order_by(ArtifactRow.path)
    )
    return [Artifact(path, size, sha, None, reason) for path, size, sha, reason in rows]


async def get_artifact(db: DbSession, session_id: str, path: str) -> Artifact | None:
    row = await db.scalar(
        select(ArtifactRow).where(ArtifactRow.session_id == session_id, ArtifactRow.path == path)
    )
    if row is None:
        return None
    return Artifact(row.path, row.size, row.sha256, row.content, row.omitted_reason)
