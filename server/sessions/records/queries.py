"""Reading sessions: one by id, their events (replayed, then followed live), and pages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession as DbSession
from sqlalchemy.ext.asyncio import async_sessionmaker

from ...coalesce import Coalescer
from ...domain import Artifact, Event, Session, SessionState
from ...errors import FailedPrecondition, InvalidArgument, NotFound, quote
from ...store import artifacts as artifacts_repo
from ...store import inputs
from ...store import sessions as repo
from ...store.engine import bus_of
from ...store.notify import DELETED_CHANNEL
from ...store.sessions import SessionFilter
from ...tenants import Tenant
from ..capacity import Capacity
from ..replicas.feeds import Feeds
from ..run_request import check_labels, is_session_id
from .paging import decode_token, encode_token

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Ended sessions kept in memory for GetSession (an ended session never changes again).
ENDED_CACHE_SIZE = 4096
ENDED_CACHE_MAX_RESULT_CHARS = 65536


class SessionQueries:
    """Answers for sessions of a tenant; another tenant's is NotFound, like a missing one."""

    def __init__(self, db: async_sessionmaker[DbSession], capacity: Capacity) -> None:
        self._db = db
        self._live = capacity.live
        # Followers of sessions that another replica runs.
        self.feeds = Feeds(db)
        self._ended: OrderedDict[str, Session] = OrderedDict()
        self._reads: Coalescer[Session | None] = Coalescer()
        bus_of(db).subscribe(DELETED_CHANNEL, self.forget)

    async def get(self, tenant: Tenant, session_id: str) -> Session:
        """A session of this tenant.

        Sessions running here and recently ended ones are answered from memory: a running
        session's record is written by this server alone, and an ended one never changes.
        """
        if not session_id:
            raise InvalidArgument("session_id", "must not be empty")
        if not is_session_id(session_id):  # no session has such an id: no need to look
            raise NotFound(f"session {quote(session_id)} not found")
        live = self._live.get(session_id)
        known = live.session if live is not None else self._ended.get(session_id)
        if known is not None and known.tenant == tenant.name:
            return known
        # Concurrent calls for one session (callers polling it) share a read.
        session = await self._reads.get(
            (tenant.name, session_id), lambda: self._read(tenant.name, session_id)
        )
        if session is None:
            raise NotFound(f"session {session_id} not found")
        self.remember(session)
        return session

    async def _read(self, tenant: str, session_id: str) -> Session | None:
        async with self._db() as db:
            session = await repo.get_session(db, tenant, session_id)
            return (await _with_awaiting(db, [session]))[0] if session is not None else None

    def forget(self, session_id: str) -> None:
        """The session was deleted (here or on another replica)."""
        self._ended.pop(session_id, None)

    async def artifacts(self, tenant: Tenant, session_id: str) -> list[Artifact]:
        """The session's artifacts (kept and left out), without content."""
        await self.get(tenant, session_id)
        async with self._db() as db:
            return await artifacts_repo.list_artifacts(db, session_id)

    async def artifact(self, tenant: Tenant, session_id: str, path: str) -> Artifact:
        """One kept artifact with its content: NotFound, or FailedPrecondition if it was
        left out."""
        await self.get(tenant, session_id)
        if not path:
            raise InvalidArgument("path", "must not be empty")
        async with self._db() as db:
            found = await artifacts_repo.get_artifact(db, session_id, path)
        if found is None:
            raise NotFound(f"session {session_id} has no artifact {quote(path)}")
        if found.content is None:
            raise FailedPrecondition(f"{quote(path)} was not kept: {found.omitted_reason}")
        return found

    def remember(self, session: Session) -> None:
        """Keep an ended session for `get` (least recently ended ones go first)."""
        if not session.state.terminal or len(session.result) > ENDED_CACHE_MAX_RESULT_CHARS:
            return
        self._ended[session.id] = session
        self._ended.move_to_end(session.id)
        while len(self._ended) > ENDED_CACHE_SIZE:
            self._ended.popitem(last=False)

    async def stream(self, tenant: Tenant, session_id: str, after_seq: int) -> AsyncIterator[Event]:
        """A session's events after `after_seq`: persisted ones, then live ones to the end."""
        if after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        await self.get(tenant, session_id)
        return self.follow(tenant, session_id, after_seq)

    async def follow(self, tenant: Tenant, session_id: str, after_seq: int) -> AsyncIterator[Event]:
        """Events after `after_seq` to the end, wherever the session runs (unchecked)."""
        live = self._live.get(session_id)
        if live is not None:  # in memory from seq 1, as they are published
            async for event in live.follow(after_seq):
                yield event
            return
        # Running on another replica (or ended; or between admission and registration here).
        async for event in self.feeds.follow(tenant.name, session_id, after_seq):
            yield event

    async def list(
        self, tenant: Tenant, flt: SessionFilter, *, page_size: int, page_token: str
    ) -> tuple[list[Session], str]:
        """One page of the tenant's sessions, newest first, and the next page's token."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        # As many filters as a session can carry labels, no more: each is a join.
        check_labels(dict(flt.labels))
        if (
            flt.created_from is not None
            and flt.created_before is not None
            and flt.created_from >= flt.created_before
        ):
            raise InvalidArgument("create_time_end", "must be after create_time_start")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_token(page_token, flt) if page_token else None
        async with self._db() as db:
            rows = await repo.list_sessions(db, tenant.name, flt, after=after, limit=size + 1)
            page, more = await _with_awaiting(db, rows[:size]), len(rows) > size
        token = encode_token(page[-1].create_time, page[-1].id, flt) if more else ""
        return page, token


async def _with_awaiting(db: DbSession, sessions: list[Session]) -> list[Session]:
    """`sessions` with what the running ones wait for from their callers."""
    running = [s.id for s in sessions if s.state is SessionState.RUNNING]
    waiting = await inputs.pending(db, running)
    return [s.evolve(awaiting=tuple(waiting[s.id])) if s.id in waiting else s for s in sessions]
