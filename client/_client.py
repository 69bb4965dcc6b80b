"""The synchronous client: the client core (``_requests.ClientCore``) over grpc's blocking
channel."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import grpc

from . import _files as files
from . import _inputs as inputs
from . import _requests as rq
from . import _values as values
from ._errors import rpc_errors
from ._health import HealthStatus
from ._stream import StreamCore
from .v1 import budget_pb2, session_pb2, usage_pb2


class EventStream(StreamCore, Iterator[session_pb2.SessionEvent]):
    """The events of one RunSession / StreamSession call, in order.

    Iterate it; errors surface as :class:`RPCError`. ``cancel()`` (or leaving a ``with``
    block) ends the call — for RunSession that is a disconnect, which cancels the session
    unless it was started with ``on_disconnect="continue"``.

    With handlers (``run(on_tool_call=..., on_permission=..., on_question=...)``), an
    ``input_request`` event is yielded first; when the next event is asked for, its
    handler runs and its answer is sent with Respond before the stream is read on.
    """

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> session_pb2.SessionEvent:
        request = self._take_pending()
        if request is not None:
            message = inputs.handle(request, self._handler(request))
            if message is not None:
                with inputs.unless_settled(request):
                    self._respond(message)
        with rpc_errors():
            return self._received(next(self._call))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class Client(
    rq.ClientCore[
        EventStream,
        session_pb2.ListSessionsResponse,
        Iterator[session_pb2.Session],
        session_pb2.InputResolved,
        Path,
        inputs.ToolCallHandler,
        inputs.PermissionHandler,
        inputs.QuestionHandler,
    ]
):
    """A blocking agentplane client.

    ``target`` defaults to ``$AGENTPLANE_TARGET`` or ``127.0.0.1:50051``; several replicas
    are a list of ``host:port`` addresses (or one string of them joined with commas) or a
    ``dns:///name:port`` target, and get health-checked ``round_robin`` (see
    :func:`agentplane.service_config`); UNAVAILABLE is retried in any case. ``token``
    defaults to ``$AGENTPLANE_TOKEN`` (sent as ``authorization: Bearer <token>``; none for a
    dev-mode server). ``secure`` (or ``root_certificates``, PEM bytes of the CA to trust
    instead of the system's) selects TLS; ``certificate_chain`` and ``private_key`` (PEM
    bytes) are a client certificate for a server that requires one (mTLS), and
    ``server_name`` the name its certificate must carry when it differs from the target's.
    ``timeout`` is the deadline in seconds of each unary call; streaming calls take their
    own. ``options`` are grpc channel options (a ``grpc.service_config`` there replaces
    agentplane's). Use it as a context manager, or call :meth:`close`.
    """

    _grpc = grpc

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the channels (calls in flight are cancelled)."""
        self._channel.close()
        if self._admission_channel is not self._channel:
            self._admission_channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- how a call is made ------------------------------------------------------------

    def _call(self, method: Callable[..., Any], build: rq.Build, pick: rq.Pick = rq.same) -> Any:
        with rpc_errors():
            return pick(self._send(method, build))

    def _stream(self, call: Any, handlers: inputs.Handlers | None) -> EventStream:
        return EventStream(
            call,
            handlers,
            lambda message: self._call(self._sessions.Respond, lambda: message),
        )

    def _pages(self, pager: rq.Pager) -> Iterator[session_pb2.Session]:
        while (request := pager.next_request()) is not None:
            yield from pager.take(self._call(self._sessions.ListSessions, lambda: request))

    def _download(
        self, session_id: values.SessionId, path: str, target: Path, timeout: float | None
    ) -> Path:
        return files.write_file(target, self.get_artifact(session_id, path, timeout=timeout))

    # -- calls -------------------------------------------------------------------------

    def run_for_result(self, prompt: str, output_schema: files.SchemaLike, **kwargs: Any) -> Any:
        """Run a session to its end and return its structured result, parsed (a value
        matching ``output_schema``). ``kwargs`` are those of :meth:`run` (handlers too).

        Raises :class:`SessionFailed` (with the final Session) if the session ended ERROR,
        e.g. reason INVALID_OUTPUT when the agent's result did not match the schema;
        :class:`RPCError` if it was not admitted.
        """
        final: session_pb2.Session | None = None
        with self.run(prompt, output_schema=output_schema, **kwargs) as stream:
            for event in stream:
                if event.HasField("result"):
                    final = event.result.session
        return files.result_of(final)

    def get_session(self, session_id: values.SessionId) -> session_pb2.Session:
        """One session of the caller's tenant."""
        request = session_pb2.GetSessionRequest(session_id=str(session_id))
        return self._call(self._sessions.GetSession, lambda: request)

    def cancel_session(self, session_id: values.SessionId) -> session_pb2.Session:
        """Cancel a session; returns it in its terminal state."""
        request = session_pb2.CancelSessionRequest(session_id=str(session_id))
        return self._call(self._sessions.CancelSession, lambda: request)

    def delete_session(self, session_id: values.SessionId) -> None:
        """Delete an ended session (its events, transcript and artifacts; its spend stays
        in the budget). FAILED_PRECONDITION while it is IDLE or RUNNING: cancel it first."""
        request = session_pb2.DeleteSessionRequest(session_id=str(session_id))
        self._call(self._sessions.DeleteSession, lambda: request)

    def list_artifacts(self, session_id: values.SessionId) -> list[session_pb2.Artifact]:
        """The files an ended session created or changed, by path: kept ones (with size and
        SHA-256) and left-out ones (``omitted_reason`` says why)."""
        request = session_pb2.ListArtifactsRequest(session_id=str(session_id))
        return list(self._call(self._sessions.ListArtifacts, lambda: request).artifacts)

    def get_artifact(
        self, session_id: values.SessionId, path: str, *, timeout: float | None = None
    ) -> bytes:
        """One kept artifact's content, its chunks checked (offsets, size, SHA-256;
        :class:`ArtifactError` otherwise). A left-out file is FAILED_PRECONDITION, a missing
        one NOT_FOUND. ``timeout``: the whole download's deadline (default the client's)."""
        call, assembler = self._artifact_call(session_id, path, timeout)
        with rpc_errors(call):
            for chunk in call:
                assembler.add(chunk)
        return assembler.content()

    def get_budget(self, date: str | dt.date | None = None) -> budget_pb2.Budget:
        """The tenant's budget window for ``date`` ("YYYY-MM-DD" or a date; None: today)."""
        return self._call(self._budgets.GetBudget, lambda: rq.budget_request(date))

    def get_usage(
        self, *, start_time: values.Time | None = None, end_time: values.Time | None = None
    ) -> usage_pb2.Usage:
        """The tenant's usage over [start_time, end_time)."""
        return self._call(self._usage.GetUsage, lambda: rq.usage_request(start_time, end_time))

    def health(self, service: str = "") -> HealthStatus:
        """grpc.health.v1 Check for ``service`` ("" is the server as a whole). Over several
        replicas, a replica that is ready answers; with none ready the call fails
        UNAVAILABLE."""
        return self._call(self._health_check, lambda: service)
