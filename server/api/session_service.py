"""agentplane.v1.SessionService: thin proto <-> SessionManager adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from agentplane.v1 import session_pb2, session_pb2_grpc

from ..domain import Event, Session
from ..errors import AgentplaneError, InvalidArgument
from ..sessions.manager import SessionManager
from ..store.sessions import SessionFilter
from ..telemetry.rpc import CallSpans
from ..telemetry.setup import ContentPolicy
from ..tenants import Tenant, TenantRegistry
from . import convert
from .auth import caller
from .errors import streaming, unary

# GetArtifact's chunks: well under any client's message limit.
ARTIFACT_CHUNK_BYTES = 64 << 10


class SessionService(session_pb2_grpc.SessionServiceServicer):
    """`spans` tells each call's span its tenant and the session it is about (default:
    content not recorded)."""

    def __init__(
        self, tenants: TenantRegistry, sessions: SessionManager, spans: CallSpans | None = None
    ) -> None:
        self._tenants = tenants
        self._sessions = sessions
        self._spans = spans or CallSpans(ContentPolicy())

    def _caller(self, context: grpc.aio.ServicerContext) -> Tenant:
        tenant = caller(self._tenants, context)
        self._spans.caller(tenant.name)
        return tenant

    async def _about(self, tenant: Tenant, session_id: str) -> None:
        """The call is about a session: its span says which and links to its trace (a
        read from memory for sessions running or ended here)."""
        if not self._spans.recording():
            return
        try:
            session = await self._sessions.get(tenant, session_id)
        except AgentplaneError:  # deleted meanwhile, or the database went away: no matter
            return
        self._spans.session(session)

    def _session(self, session: Session) -> session_pb2.Session:
        """A session to answer with (the call's span says which it was)."""
        self._spans.session(session)
        return convert.session_to_proto(session)

    def _event(self, event: Event) -> session_pb2.SessionEvent:
        """An event to send (the last one also tells the call's span how it ended)."""
        self._spans.event(event)
        return convert.event_to_proto(event)

    @streaming
    async def RunSession(
        self, request: session_pb2.RunSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.SessionEvent]:
        tenant = self._caller(context)
        admission = await self._sessions.start(tenant, convert.run_request(request))
        if admission.live is not None:
            self._spans.session(admission.live.session, prompt=request.prompt)
        else:  # a repeated request_id: re-attached to the session it started
            await self._about(tenant, admission.session_id)
        if not self._tenants.current(tenant):
            # Removed by a reload while this admission ran, after the reload stopped the
            # tenant's sessions: this one must not outlive the tenant either.
            self._sessions.cancel_removed(admission)
        ended = False
        try:
            async for event in admission.events:
                yield self._event(event)
            ended = True
        finally:
            # The caller went away mid-stream (cancelled, or the stream was closed while
            # suspended between events, which arrives as GeneratorExit instead).
            if not ended and request.on_disconnect != session_pb2.ON_DISCONNECT_CONTINUE:
                self._sessions.cancel_on_disconnect(admission)

    @streaming
    async def StreamSession(
        self, request: session_pb2.StreamSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.SessionEvent]:
        tenant = self._caller(context)
        events = await self._sessions.stream(tenant, request.session_id, request.after_seq)
        await self._about(tenant, request.session_id)
        async for event in events:
            yield self._event(event)

    @unary
    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Session:
        tenant = self._caller(context)
        session = await self._sessions.get(tenant, request.session_id)
        return self._session(session)

    @unary
    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ListSessionsResponse:
        tenant = self._caller(context)
        flt = SessionFilter(
            state=convert.state_from_proto(request.state),
            created_from=convert.from_timestamp(request, "create_time_start"),
            created_before=convert.from_timestamp(request, "create_time_end"),
            labels=tuple(sorted(request.labels.items())),
            awaiting=request.awaiting,
            paused=request.paused,
        )
        page, token = await self._sessions.list(
            tenant, flt, page_size=request.page_size, page_token=request.page_token
        )
        return session_pb2.ListSessionsResponse(
            sessions=[convert.session_to_proto(s) for s in page], next_page_token=token
        )

    @unary
    async def CancelSession(
        self, request: session_pb2.CancelSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Session:
        tenant = self._caller(context)
        session = await self._sessions.cancel(tenant, request.session_id)
        return self._session(session)

    @unary
    async def UpdateSessionBudget(
        self, request: session_pb2.UpdateSessionBudgetRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Session:
        tenant = self._caller(context)
        session = await self._sessions.update_budget(
            tenant, request.session_id, request.max_budget_usd
        )
        return self._session(session)

    @unary
    async def Respond(
        self, request: session_pb2.RespondRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.RespondResponse:
        tenant = self._caller(context)
        if not request.session_id:
            raise InvalidArgument("session_id", "must not be empty")
        kind, answer = convert.respond_request(request)
        settled, recorded = await self._sessions.respond(
            tenant, request.session_id, request.request_id, kind, answer
        )
        await self._about(tenant, request.session_id)
        return session_pb2.RespondResponse(
            resolved=convert.input_resolved_to_proto(recorded.to_json(settled))
        )

    @unary
    async def ListArtifacts(
        self, request: session_pb2.ListArtifactsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ListArtifactsResponse:
        tenant = self._caller(context)
        found = await self._sessions.artifacts(tenant, request.session_id)
        return session_pb2.ListArtifactsResponse(
            artifacts=[convert.artifact_to_proto(a) for a in found]
        )

    @streaming
    async def GetArtifact(
        self, request: session_pb2.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.ArtifactChunk]:
        tenant = self._caller(context)
        found = await self._sessions.artifact(tenant, request.session_id, request.path)
        content = found.content or b""
        for offset in range(0, max(len(content), 1), ARTIFACT_CHUNK_BYTES):
            chunk = session_pb2.ArtifactChunk(
                data=content[offset : offset + ARTIFACT_CHUNK_BYTES], offset=offset
            )
            if offset == 0:
                chunk.artifact.CopyFrom(convert.artifact_to_proto(found))
            yield chunk

    @unary
    async def DeleteSession(
        self, request: session_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.DeleteSessionResponse:
        tenant = self._caller(context)
        await self._sessions.delete(tenant, request.session_id)
        return session_pb2.DeleteSessionResponse(session_id=request.session_id)
