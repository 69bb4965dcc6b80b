"""The metering gateway: a loopback proxy in front of the Messages API that keeps every
session within its budget.

Each session's CLI gets ``base_url`` as its ``ANTHROPIC_BASE_URL`` and a per-session
token as its ``ANTHROPIC_API_KEY``; the tenant's real key stays in this process and is
put on the forwarded request only. For each ``POST /v1/messages`` the gateway prices the
requested model, reserves the request's worst case out of the session's remaining budget
(lowering ``max_tokens``, and an enabled thinking budget with it, to what the budget
covers, or refusing below ``min_output_tokens``), streams the response through
unchanged while reading its usage on the side, and settles: the reservation is released
and the priced usage is added to the session's spend (see :mod:`.gateway_meter`).

Routes: ``POST /v1/messages`` (metered), ``POST /v1/messages/count_tokens`` (forwarded,
free), ``/mcp/<server>/...`` (the session's remote MCP servers, see :mod:`..mcp.relay`);
anything else is 404. Unauthenticated requests get 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Self

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..domain import TokenUsage, utcnow
from ..mcp import relay
from ..mcp.servers import RemoteServer
from .gateway_meter import (
    MeteredRequest,
    Reservation,
    SessionMeter,
    estimate_input_tokens,
    fit_body,
    thinking_budget,
)
from .gateway_sse import SideDecoder, SseUsageParser, usage_from_message
from .pricing import PriceTable, UnknownModel

log = logging.getLogger(__name__)

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
BUDGET_EXHAUSTED = "session budget exhausted"

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
_LONG_CACHE = re.compile(rb'"ttl"\s*:\s*"1h"')


def error_response(
    status: int, error_type: str, message: str, *, should_retry: bool | None = False
) -> web.Response:
    """An Anthropic-style JSON error (``x-should-retry`` set unless ``should_retry`` is
    None)."""
    headers = {"request-id": "req_agentplane_" + secrets.token_hex(8)}
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


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


class MeteringGateway:
    """The gateway server. ``start()`` binds ``host:port`` (port 0: a free one).

    ``upstream_timeout_s`` is the longest the gateway waits for the next bytes of an
    upstream response (not the whole response: a long generation may stream for longer);
    ``input_margin`` the safety margin of the input estimate; ``min_output_tokens`` the
    smallest ``max_tokens`` worth forwarding when the budget forces it down.
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
    ) -> None:
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
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("metering gateway already started")
        app = web.Application(client_max_size=64 * 1024 * 1024)
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
    ) -> SessionMeter:
        """Start metering a session; its CLI authenticates with the meter's ``token``.
        `mcp_servers`: the remote MCP servers it may reach through the relay, by name."""
        if session_id in self._meters:
            raise ValueError(f"session {session_id} already has an open meter")
        if Decimal(budget_usd) < 0:
            raise ValueError("budget_usd must be >= 0")
        if not upstream_api_key:
            raise ValueError(f"session {session_id}: no upstream API key")
        meter = SessionMeter(
            session_id,
            budget_usd=Decimal(budget_usd),
            upstream_base_url=upstream_base_url,
            upstream_api_key=upstream_api_key,
            token=secrets.token_urlsafe(32),
        )
        meter.mcp_servers = dict(mcp_servers or {})
        self._meters[session_id] = meter
        self._by_token[_digest(meter.token)] = meter
        return meter

    def close_session(self, session_id: str) -> SessionMeter | None:
        """Stop accepting the session's token (401 from now on); returns its meter.

        Requests already in flight finish and settle into the returned meter.
        """
        meter = self._meters.pop(session_id, None)
        if meter is not None:
            self._by_token.pop(_digest(meter.token), None)
            meter.closed = True
        return meter

    def meter(self, session_id: str) -> SessionMeter | None:
        """The open meter of a session, if any."""
        return self._meters.get(session_id)

    # -- HTTP ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = _token_of(request)
        meter = self._by_token.get(_digest(token)) if token else None
        if meter is None:
            return error_response(401, "authentication_error", "invalid x-api-key")
        if request.path.startswith(relay.ROUTE):
            return await relay.forward(request, self._http, meter.mcp_servers, meter.session_id)
        if request.method == "POST" and request.path == MESSAGES:
            return await self._messages(request, meter)
        if request.method == "POST" and request.path == COUNT_TOKENS:
            return await self._pass_through(request, meter)
        return error_response(
            404, "not_found_error", f"Not found: {request.method} {request.path}", should_retry=None
        )

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

    async def _pass_through(self, request: web.Request, meter: SessionMeter) -> web.Response:
        """Forward as is, answer with upstream's reply (count_tokens: free)."""
        raw = await request.read()
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

    async def _messages(self, request: web.Request, meter: SessionMeter) -> web.StreamResponse:
        raw = await request.read()
        record = MeteredRequest(model="", price_version=self.prices.version)
        body = _json_object(raw)
        if body is None:
            return self._refuse(meter, record, "invalid", "request body must be a JSON object")
        model, max_tokens = body.get("model"), body.get("max_tokens")
        record.model = model if isinstance(model, str) else ""
        record.stream = bool(body.get("stream"))
        record.thinking_budget_requested = thinking_budget(body)
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            record.max_tokens_requested = max_tokens
        if not record.model:
            return self._refuse(meter, record, "invalid", "model: a model id is required")
        if record.max_tokens_requested is None or record.max_tokens_requested < 1:
            return self._refuse(meter, record, "invalid", "max_tokens: must be an integer >= 1")
        try:
            price = self.prices.price(record.model)
        except UnknownModel as exc:
            return self._refuse(meter, record, "refused", exc.description)

        estimate = estimate_input_tokens(body, self.input_margin)
        record.input_tokens_estimate = estimate
        record.price_version = price.version
        reservation = meter.reserve(
            price,
            estimate,
            record.max_tokens_requested,
            min_output_tokens=self.min_output_tokens,
            long_cache=bool(_LONG_CACHE.search(raw)),
        )
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
        if reservation.max_tokens < record.max_tokens_requested:
            fitted, record.thinking_budget_forwarded = fit_body(body, reservation.max_tokens)
            data = json.dumps(fitted, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            record.thinking_budget_forwarded = record.thinking_budget_requested
            data = raw
        return await self._forward(request, meter, reservation, record, data)

    def _refuse(
        self, meter: SessionMeter, record: MeteredRequest, outcome: str, message: str
    ) -> web.Response:
        record.status, record.outcome = 400, outcome
        meter.settle(None, record)
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
