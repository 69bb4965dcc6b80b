"""The metering gateway: a loopback proxy in front of the Messages API that keeps every
session within its budget.

Each session's CLI gets ``base_url`` as its ``ANTHROPIC_BASE_URL`` and a per-session
token as its ``ANTHROPIC_API_KEY``; the tenant's real key stays in this process and is
put on the forwarded request only. For each ``POST /v1/messages`` the gateway prices the
requested model, reserves the request's worst case out of the session's remaining budget
(lowering ``max_tokens``, and an enabled thinking budget with it, to what the budget
covers, or refusing below ``min_output_tokens``; a metered server tool it offers, such as
web search, is reserved for at its ``max_uses``, which is capped at the session's maximum
and set where missing, see :mod:`.server_tools`), streams the response through
unchanged while reading its usage on the side, and settles: the reservation is released
and the priced usage is added to the session's spend (see :mod:`.gateway_meter`).

Routes: ``POST /v1/messages`` (metered), ``POST /v1/messages/count_tokens`` (forwarded,
free), ``/mcp/<server>/...`` (the session's remote MCP servers, see :mod:`..mcp.relay`);
anything else is 404. Unauthenticated requests get 401. On every route a body over
``max_body_bytes`` gets 413 before it is buffered, and a session has at most a few
bodies read and parsed at once (see :mod:`.gateway_limits`); a large body is parsed and
estimated off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable, Collection, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Self

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..domain import TokenUsage, utcnow
from ..mcp.servers import RemoteServer
from ..money.pricing import PriceTable, UnknownModel
from . import mcp_relay as relay
from . import server_tools
from .limits import (
    MAX_BODY_BYTES,
    READS_PER_SESSION,
    WAITING_PER_SESSION,
    BodyTooLarge,
    ReadSlots,
    TooManyReads,
    over_cap,
    read_body,
)
from .meter import DEFAULT_MAX_SERVER_TOOL_USES, MeteredRequest, Reservation, SessionMeter
from .parse import OFF_LOOP_BYTES, BodyParser, ParseFailed, inspect, refit
from .sse import SideDecoder, SseUsageParser, usage_from_message

log = logging.getLogger(__name__)

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
BUDGET_EXHAUSTED = "session budget exhausted"
UNPARSED = "the request body could not be parsed (the gateway's parser failed)"

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The agent's credentials never go upstream; the gateway asks for an uncompressed body
# so it can read the usage (the agent gets the same bytes upstream sent).
_DROP_REQUEST = _HOP_BY_HOP | {
    "host",
    "content-length",
    "x-api-key",
    "authorization",
    "accept-encoding",
}
_DROP_RESPONSE = _HOP_BY_HOP | {"content-length"}


def error_response(
    status: int,
    error_type: str,
    message: str,
    *,
    should_retry: bool | None = False,
    retry_after_s: int | None = None,
) -> web.Response:
    """An Anthropic-style JSON error (``x-should-retry`` set unless ``should_retry`` is
    None)."""
    headers = {"request-id": "req_agentplane_" + secrets.token_hex(8)}
    if retry_after_s is not None:
        headers["retry-after"] = str(retry_after_s)
    if should_retry is not None:
        headers["x-should-retry"] = "true" if should_retry else "false"
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _token_of(request: web.Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


class MeteringGateway:
    """The gateway server. ``start()`` binds ``host:port`` (port 0: a free one).

    ``upstream_timeout_s`` is the longest the gateway waits for the next bytes of an
    upstream response (not the whole response: a long generation may stream for longer);
    ``input_margin`` the safety margin of the input estimate; ``min_output_tokens`` the
    smallest ``max_tokens`` worth forwarding when the budget forces it down;
    ``max_body_bytes`` the largest request body read (413 above); ``reads_per_session``
    and ``waiting_per_session`` how many of a session's bodies are read at once and how
    many more may wait for their turn (429 beyond); ``parse_off_loop_bytes`` the size above
    which a body is parsed in a worker process.
    """

    def __init__(
        self,
        prices: PriceTable,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_timeout_s: float = 600.0,
        connect_timeout_s: float = 30.0,
        input_margin: float = 0.2,
        min_output_tokens: int = 512,
        unix_socket: Path | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        reads_per_session: int = READS_PER_SESSION,
        waiting_per_session: int = WAITING_PER_SESSION,
        parse_off_loop_bytes: int = OFF_LOOP_BYTES,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        if input_margin < 0:
            raise ValueError("input_margin must be >= 0")
        if min_output_tokens < 1:
            raise ValueError("min_output_tokens must be >= 1")
        self.prices = prices
        self.host = host
        self.port = port
        self.upstream_timeout_s = upstream_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.input_margin = input_margin
        self.min_output_tokens = min_output_tokens
        self.max_body_bytes = max_body_bytes
        self.reads_per_session = reads_per_session
        self.waiting_per_session = waiting_per_session
        ReadSlots(reads_per_session, waiting_per_session)  # checks the two
        # Also served on this unix socket: sandboxed agents reach the gateway only there.
        self.unix_socket = unix_socket
        self._meters: dict[str, SessionMeter] = {}
        # Told True when the model API answered, False when it could not be reached
        # (health reports it; see app.py). Must not raise.
        self.on_upstream: Callable[[bool], None] = lambda _reachable: None
        # Keep each forwarded request's body and its reply's content on its record, for
        # traces that record content (AGENTPLANE_TRACE_CONTENT); off, neither is kept.
        self.keep_content = False
        self._by_token: dict[bytes, SessionMeter] = {}
        self._reads: dict[str, ReadSlots] = {}
        # Bodies over parse_off_loop_bytes are parsed in worker processes.
        self._parser = BodyParser(off_loop_bytes=parse_off_loop_bytes)
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("metering gateway already started")
        # client_max_size: a backstop; every body is read by gateway_limits.read_body.
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: when the agent goes away, its upstream request is closed.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            if self.unix_socket is not None:
                self.unix_socket.unlink(missing_ok=True)  # a server that died left it
                await web.UnixSite(runner, str(self.unix_socket)).start()
                # Agents running as a tenant's os_user connect to it too.
                self.unix_socket.chmod(0o666)
        except BaseException:
            await runner.cleanup()
            raise
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.connect_timeout_s,
                sock_read=self.upstream_timeout_s,
            ),
        )
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving; requests in flight are cut off and settled from what was seen."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._parser.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: the agent's ANTHROPIC_BASE_URL."""
        if self._runner is None:
            raise RuntimeError("metering gateway not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- sessions --------------------------------------------------------------------

    def open_session(
        self,
        session_id: str,
        *,
        budget_usd: Decimal,
        upstream_base_url: str,
        upstream_api_key: str,
        mcp_servers: Mapping[str, RemoteServer] | None = None,
        tools: Collection[str] | None = None,
        max_server_tool_uses: int = DEFAULT_MAX_SERVER_TOOL_USES,
    ) -> SessionMeter:
        """Start metering a session; its CLI authenticates with the meter's ``token``.
        `mcp_servers`: the remote MCP servers it may reach through the relay, by name;
        `tools`: the session's tools, which say which server tools its requests may offer
        (None: any); `max_server_tool_uses`: the most uses a request may have of each."""
        if session_id in self._meters:
            raise ValueError(f"session {session_id} already has an open meter")
        if Decimal(budget_usd) < 0:
            raise ValueError("budget_usd must be >= 0")
        if not upstream_api_key:
            raise ValueError(f"session {session_id}: no upstream API key")
        if max_server_tool_uses < 1:
            raise ValueError("max_server_tool_uses must be >= 1")
        meter = SessionMeter(
            session_id,
            budget_usd=Decimal(budget_usd),
            upstream_base_url=upstream_base_url,
            upstream_api_key=upstream_api_key,
            token=secrets.token_urlsafe(32),
            tools=tools,
            max_server_tool_uses=max_server_tool_uses,
        )
        meter.mcp_servers = dict(mcp_servers or {})
        self._meters[session_id] = meter
        self._reads[session_id] = ReadSlots(self.reads_per_session, self.waiting_per_session)
        self._by_token[_digest(meter.token)] = meter
        return meter

    def close_session(self, session_id: str) -> SessionMeter | None:
        """Stop accepting the session's token (401 from now on); returns its meter.

        Requests already in flight finish and settle into the returned meter.
        """
        meter = self._meters.pop(session_id, None)
        self._reads.pop(session_id, None)
        if meter is not None:
            self._by_token.pop(_digest(meter.token), None)
            meter.closed = True
        return meter

    def meter(self, session_id: str) -> SessionMeter | None:
        """The open meter of a session, if any."""
        return self._meters.get(session_id)

    def read_slots(self, session_id: str) -> ReadSlots | None:
        """The read turns of an open session (how many of its bodies are read, and wait)."""
        return self._reads.get(session_id)

    # -- HTTP ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = _token_of(request)
        meter = self._by_token.get(_digest(token)) if token else None
        if meter is None:
            return error_response(401, "authentication_error", "invalid x-api-key")
        slots = self._reads[meter.session_id]
        try:
            if (too_large := over_cap(request, self.max_body_bytes)) is not None:
                raise too_large
            if request.path.startswith(relay.ROUTE):
                return await self._relay(request, meter, slots)
            if request.method == "POST" and request.path == MESSAGES:
                return await self._messages(request, meter, slots)
            if request.method == "POST" and request.path == COUNT_TOKENS:
                return await self._pass_through(request, meter, slots)
        except BodyTooLarge as exc:
            return self._too_large(meter, slots, exc)
        except TooManyReads:
            return self._busy(meter, slots)
        return error_response(
            404, "not_found_error", f"Not found: {request.method} {request.path}", should_retry=None
        )

    def _too_large(self, meter: SessionMeter, slots: ReadSlots, exc: BodyTooLarge) -> web.Response:
        if "too_large" not in slots.logged:  # once per session: a flood is not a log flood
            slots.logged.add("too_large")
            log.warning(
                "gateway session=%s: a request body over %d bytes refused (413; logged once)",
                meter.session_id,
                exc.limit,
            )
        size = f"of {exc.declared:,} bytes " if exc.declared is not None else ""
        return error_response(
            413,
            "request_too_large",
            f"the request body {size}is over the limit of {exc.limit:,} bytes "
            "(the Messages API's own limit is 32 MB)",
        )

    def _busy(self, meter: SessionMeter, slots: ReadSlots) -> web.Response:
        if "busy" not in slots.logged:
            slots.logged.add("busy")
            log.warning(
                "gateway session=%s: too many requests at once, answered 429 (logged once)",
                meter.session_id,
            )
        return error_response(
            429,
            "rate_limit_error",
            f"too many requests of this session at once ({slots.reads} being read, "
            f"{slots.waiting_max} waiting): retry when one has been answered",
            should_retry=True,
            retry_after_s=1,
        )

    async def _read(self, request: web.Request, slots: ReadSlots) -> bytes:
        """The request's body, read in one of the session's turns (capped)."""
        async with slots.turn():
            return await read_body(request, self.max_body_bytes)

    async def _relay(
        self, request: web.Request, meter: SessionMeter, slots: ReadSlots
    ) -> web.StreamResponse:
        body = await self._read(request, slots)
        return await relay.forward(request, body, self._http, meter.mcp_servers, meter.session_id)

    def _unanswered(self, exc: BaseException, meter: SessionMeter) -> web.Response:
        """What the agent gets when upstream gave no (complete) answer."""
        if not isinstance(exc, aiohttp.ClientConnectorError):
            return _upstream_failure(exc)
        # Refused, or no such host: not a blip that minutes of the CLI's retries would cure.
        self.on_upstream(False)
        where = URL(meter.upstream_base_url).with_user(None).with_password(None)
        return error_response(
            502,
            "api_error",
            f"the model API at {where} cannot be reached ({type(exc.os_error).__name__}): "
            "check ANTHROPIC_BASE_URL and the network",
            should_retry=False,
        )

    def _upstream(self, request: web.Request, meter: SessionMeter) -> tuple[URL, CIMultiDict[str]]:
        url = URL(meter.upstream_base_url + request.raw_path, encoded=True)
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _DROP_REQUEST
        )
        headers["x-api-key"] = meter.upstream_api_key
        headers["accept-encoding"] = "identity"
        return url, headers

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise RuntimeError("metering gateway not started")
        return self._client

    async def _pass_through(
        self, request: web.Request, meter: SessionMeter, slots: ReadSlots
    ) -> web.Response:
        """Forward as is, answer with upstream's reply (count_tokens: free)."""
        raw = await self._read(request, slots)
        url, headers = self._upstream(request, meter)
        try:
            async with self._http.post(url, data=raw, headers=headers) as up:
                self.on_upstream(True)
                payload = await up.read()
                return web.Response(
                    status=up.status, reason=up.reason, body=payload, headers=_reply_headers(up)
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._unanswered(exc, meter)

    async def _messages(
        self, request: web.Request, meter: SessionMeter, slots: ReadSlots
    ) -> web.StreamResponse:
        # The read turn covers reading, parsing and the reservation, not the forwarding:
        # the body and its parse are dropped once `_meter` returns (but the bytes sent).
        async with slots.turn():
            metered = await self._meter(request, meter)
        if isinstance(metered, web.Response):
            return metered
        reservation, record, data = metered
        return await self._forward(request, meter, reservation, record, data)

    async def _meter(
        self, request: web.Request, meter: SessionMeter
    ) -> web.Response | tuple[Reservation, MeteredRequest, bytes]:
        """Read, check and price a Messages request and reserve its worst case: what to
        forward, or the refusal."""
        raw = await read_body(request, self.max_body_bytes)
        record = MeteredRequest(model="", price_version=self.prices.version)
        reservation: Reservation | None = None
        try:
            facts = await self._parser.run(len(raw), inspect, raw, self.input_margin)
            if facts.invalid is not None:
                return self._refuse(meter, record, "invalid", facts.invalid)
            record.model = facts.model
            record.stream = facts.stream
            record.thinking_budget_requested = facts.thinking_budget
            record.max_tokens_requested = facts.max_tokens
            if not record.model:
                return self._refuse(meter, record, "invalid", "model: a model id is required")
            if record.max_tokens_requested is None or record.max_tokens_requested < 1:
                return self._refuse(meter, record, "invalid", "max_tokens: must be an integer >= 1")
            try:
                price = self.prices.price(record.model)
            except UnknownModel as exc:
                return self._refuse(meter, record, "refused", exc.description)

            tools = facts.server_tools
            if meter.tools is not None and (barred := server_tools.not_allowed(tools, meter.tools)):
                return self._refuse(
                    meter,
                    record,
                    "refused",
                    f"tools: the server tool {barred.type} needs {barred.allowed_by} among the "
                    "session's tools",
                )
            record.input_tokens_estimate = facts.input_tokens_estimate
            record.price_version = price.version
            while True:
                reservation = meter.reserve(
                    price,
                    facts.input_tokens_estimate,
                    record.max_tokens_requested,
                    min_output_tokens=self.min_output_tokens,
                    long_cache=facts.long_cache,
                    tools=tools,
                )
                # A session that pauses at its budget holds the request until the budget
                # is raised (then it is reserved anew: forwarded only once that holds).
                if reservation is not None or meter.hold is None or not await meter.hold():
                    break
            if reservation is None:
                log.info(
                    "gateway session=%s refused: budget exhausted (remaining %s USD, model %s)",
                    meter.session_id,
                    meter.remaining_usd,
                    record.model,
                )
                return self._refuse(meter, record, "refused", BUDGET_EXHAUSTED)
            record.reserved_usd = reservation.amount_usd
            record.max_tokens_forwarded = reservation.max_tokens
            record.server_tool_uses_forwarded = {
                tool.unit: reservation.uses[tool.index] for tool in tools
            }
            # max_uses is set wherever it differs from what the request asked for.
            uses = {
                t.index: reservation.uses[t.index]
                for t in tools
                if reservation.uses[t.index] != t.requested
            }
            if reservation.max_tokens == record.max_tokens_requested and not uses:
                record.thinking_budget_forwarded = record.thinking_budget_requested
                return reservation, record, raw
            data, record.thinking_budget_forwarded = await self._parser.run(
                len(raw), refit, raw, reservation.max_tokens, uses
            )
            return reservation, record, data
        except ParseFailed:  # not forwarded: a reservation is released
            return self._refuse(meter, record, "invalid", UNPARSED, reservation)
        except BaseException:
            if reservation is not None:  # the agent went away before it was forwarded
                record.outcome = "client_disconnected"
                meter.settle(reservation, record)
            raise

    def _refuse(
        self,
        meter: SessionMeter,
        record: MeteredRequest,
        outcome: str,
        message: str,
        reservation: Reservation | None = None,
    ) -> web.Response:
        record.status, record.outcome = 400, outcome
        meter.settle(reservation, record)
        return error_response(400, "invalid_request_error", message)

    async def _forward(
        self,
        request: web.Request,
        meter: SessionMeter,
        reservation: Reservation,
        record: MeteredRequest,
        data: bytes,
    ) -> web.StreamResponse:
        url, headers = self._upstream(request, meter)
        usage: TokenUsage | None = None
        parser: SseUsageParser | None = None
        if self.keep_content:
            record.request_body = data
            record.response.content = []
        try:
            async with self._http.post(url, data=data, headers=headers) as up:
                self.on_upstream(True)
                record.status = up.status
                record.upstream_request_id = up.headers.get("request-id", "")
                if up.status >= 300:
                    # Errors pass through unchanged and cost nothing.
                    payload = await up.read()
                    record.outcome = "upstream_error"
                    return web.Response(
                        status=up.status,
                        reason=up.reason,
                        body=payload,
                        headers=_reply_headers(up),
                    )
                if up.content_type != "text/event-stream":
                    payload = await up.read()
                    decoder = SideDecoder(up.headers.get("content-encoding"))
                    usage = usage_from_message(decoder.decode(payload), record.response)
                    record.outcome = "completed" if usage is not None else "usage_missing"
                    return web.Response(
                        status=up.status,
                        reason=up.reason,
                        body=payload,
                        headers=_reply_headers(up),
                    )
                parser = SseUsageParser(keep_content=self.keep_content)
                record.response = parser.response
                return await self._stream(request, up, parser, record)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # No (complete) response from upstream: the agent gets a retryable error.
            record.outcome = "upstream_failed"
            response = self._unanswered(exc, meter)
            record.status = response.status
            return response
        except asyncio.CancelledError:
            record.outcome = record.outcome or "client_disconnected"
            raise
        finally:
            if parser is not None and parser.saw_usage:
                usage = parser.usage
            if record.outcome == "usage_missing":
                record.cost_usd = reservation.amount_usd
                log.warning(
                    "gateway_usage_missing",
                    extra={
                        "session_id": meter.session_id,
                        "model": record.model,
                        "detail": "a response without usage, charged its worst case",
                        "cost_usd": str(reservation.amount_usd),
                    },
                )
            elif usage is not None:
                record.usage = usage
                record.cost_usd = reservation.price.cost(usage)
                unpriced = reservation.price.unpriced_units(usage)
                if unpriced:
                    log.warning(
                        "gateway session=%s: model %s has no price for %s; metered at the "
                        "highest price the table has (%s)",
                        meter.session_id,
                        record.model,
                        ", ".join(f"{unit} x{usage.server_tool_use[unit]}" for unit in unpriced),
                        ", ".join(
                            f"{unit} {reservation.price.use_price(unit)} USD" for unit in unpriced
                        ),
                    )
            record.ended_at = utcnow()
            # The session's observer writes the request's log line (`model_request`, with
            # its tenant and its chat span's trace ids).
            meter.settle(reservation, record)
            # Content was kept for the chat span, made in settle: the meter keeps its
            # records for the session's life, not the bodies of its conversation.
            record.request_body = record.response.content = None

    async def _stream(
        self,
        request: web.Request,
        up: aiohttp.ClientResponse,
        parser: SseUsageParser,
        record: MeteredRequest,
    ) -> web.StreamResponse:
        """Relay an SSE body chunk by chunk as it arrives, feeding a copy to ``parser``."""
        decoder = SideDecoder(up.headers.get("content-encoding"))
        response = web.StreamResponse(
            status=up.status, reason=up.reason, headers=_reply_headers(up)
        )
        try:
            await response.prepare(request)
        except ConnectionError:
            record.outcome = "client_disconnected"
            return response
        while True:
            try:
                chunk = await up.content.readany()
            except (aiohttp.ClientError, TimeoutError):
                # Upstream broke off: break the agent's stream the same way.
                record.outcome = "upstream_dropped"
                _abort(request)
                return response
            if not chunk:
                break
            if record.first_chunk_at is None:
                record.first_chunk_at = utcnow()
            parser.feed(decoder.decode(chunk))
            try:
                await response.write(chunk)
            except ConnectionError:
                record.outcome = "client_disconnected"
                return response
        parser.close()
        try:
            await response.write_eof()
        except ConnectionError:
            record.outcome = "client_disconnected"
            return response
        if parser.error is not None:
            record.outcome = "upstream_error"  # an `error` event; what was seen is charged
        elif not parser.saw_usage:
            record.outcome = "usage_missing"  # a clean end without usage: never free
        else:
            record.outcome = "completed" if parser.saw_stop else "upstream_dropped"
        return response


def _reply_headers(up: aiohttp.ClientResponse) -> CIMultiDict[str]:
    return CIMultiDict(
        (name, value) for name, value in up.headers.items() if name.lower() not in _DROP_RESPONSE
    )


def _upstream_failure(exc: BaseException) -> web.Response:
    """The error the agent gets when upstream gave no (complete) answer: retryable."""
    if isinstance(exc, TimeoutError):
        return error_response(
            504, "timeout_error", "the model API did not answer in time", should_retry=None
        )
    return error_response(
        502,
        "api_error",
        f"the model API could not be reached ({type(exc).__name__})",
        should_retry=None,
    )
