"""The sandbox model server: the Anthropic Messages API on loopback, answered from scripts.

Routes: ``POST /v1/messages`` (SSE when ``stream`` is true, JSON otherwise),
``POST /v1/messages/count_tokens``; anything else is recorded and answered 404.
Every request is recorded in :attr:`SandboxServer.requests`, in arrival order.

Script and step are derived from the request alone (no per-connection state), so any
number of concurrent sessions can share one server: the script is named by the first
``[[sandbox:NAME]]`` marker in the first user message, the step is the number of
assistant messages. Only ``failures`` keep state: an attempt counter per
(``X-Claude-Code-Session-Id``, script, step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web

from . import routing
from .script import HttpFailure, Script, Step, ToolCall, Usage
from .sse import Reply, encode_event, new_id

log = logging.getLogger(__name__)

FINISHED_TEXT = "(sandbox: script finished)"
GREETING = "Hello from the agentplane sandbox model. You said: "
SESSION_HEADER = "x-claude-code-session-id"


@dataclass
class RecordedRequest:
    """One request the sandbox received (header names lower-cased).

    ``kind`` is ``conversation`` (answered from a script step), ``greeting`` (no script
    applies), ``side`` (a CLI side request, see :func:`routing.is_side_request`),
    ``count_tokens``, ``invalid`` or ``unknown``. ``script`` is the name of the script
    that answered (None for the default script and everything else), ``marker`` the
    name found in the prompt, ``step`` the step index, ``attempt`` the 1-based attempt
    of that step, ``status`` the HTTP status sent (None while in progress, and when the
    connection was dropped or held until it closed).
    """

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    script: str | None
    step: int | None
    kind: str = "unknown"
    marker: str | None = None
    attempt: int | None = None
    status: int | None = None
    query: str = ""
    # The usage the reply reported (None: no reply, or an error): what upstream would bill.
    usage: Usage | None = None

    @property
    def stream(self) -> bool:
        """Whether the request asked for SSE."""
        return bool(self.body and self.body.get("stream"))


def error_response(
    status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An Anthropic-style JSON error reply."""
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return web.json_response(
        body, status=status, headers={"request-id": new_id("req_"), **(headers or {})}
    )


class SandboxServer:
    """A scripted Anthropic Messages API server bound to loopback.

    ``scripts`` are chosen by ``[[sandbox:NAME]]`` markers; ``default`` answers requests
    without a (known) marker; with no default such requests get a friendly greeting.
    """

    def __init__(
        self,
        scripts: Mapping[str, Script] | None = None,
        default: Script | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.default = default
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self._attempts: dict[tuple[str, str | None, int], int] = {}
        self._in_flight = 0
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``host:port`` (port 0 picks a free one) and start serving."""
        if self._runner is not None:
            raise RuntimeError("sandbox server already started")
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a held request ends as soon as its client goes away.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Release held connections and stop serving."""
        if self._runner is None:
            return
        self._stopping.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``: the value for ANTHROPIC_BASE_URL."""
        if self._runner is None:
            raise RuntimeError("sandbox server not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def in_flight(self) -> int:
        """Requests being answered right now (delayed, held, or still streaming)."""
        return self._in_flight

    # -- scripts -----------------------------------------------------------------------

    def add_script(self, name: str, script: Script) -> None:
        """Register (or replace) a script while running."""
        if not routing.MARKER.fullmatch(f"[[sandbox:{name}]]"):
            raise ValueError(f"script name {name!r} must match [A-Za-z0-9_.-]+")
        self.scripts[name] = script

    def reset(self) -> None:
        """Forget recorded requests and attempt counters."""
        self.requests.clear()
        self._attempts.clear()

    def find(self, *, kind: str | None = None, script: str | None = None) -> list[RecordedRequest]:
        """Recorded requests filtered by ``kind`` and/or ``script`` name."""
        return [
            r
            for r in self.requests
            if (kind is None or r.kind == kind) and (script is None or r.script == script)
        ]

    # -- HTTP --------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            script=None,
            step=None,
        )
        self.requests.append(record)
        log.debug("sandbox %s %s", request.method, request.path_qs)
        self._in_flight += 1
        try:
            response = await self._dispatch(request, record, raw)
        finally:
            self._in_flight -= 1
        if not self._cut_off(request):
            record.status = response.status
        return response

    @staticmethod
    def _cut_off(request: web.Request) -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    async def _dispatch(
        self, request: web.Request, record: RecordedRequest, raw: bytes
    ) -> web.StreamResponse:
        if request.method != "POST" or request.path not in (
            "/v1/messages",
            "/v1/messages/count_tokens",
        ):
            return error_response(
                404, "not_found_error", f"Not found: {request.method} {request.path}"
            )
        body = record.body
        if body is None:
            record.kind = "invalid"
            return error_response(400, "invalid_request_error", "body must be a JSON object")
        if request.path == "/v1/messages/count_tokens":
            record.kind = "count_tokens"
            return web.json_response({"input_tokens": max(1, len(raw) // 4)})
        return await self._messages(request, record, body)

    async def _messages(
        self, request: web.Request, record: RecordedRequest, body: dict[str, Any]
    ) -> web.StreamResponse:
        model = str(body.get("model") or "claude-sonnet-4-5")
        if routing.is_side_request(body):
            record.kind = "side"
            return await self._send(request, record, routing.side_reply(body, model))
        record.marker = routing.script_marker(body)
        script = self.scripts.get(record.marker) if record.marker else None
        if script is not None:
            record.script = record.marker
        else:
            script = self.default
        if script is None:
            record.kind = "greeting"
            prompt = routing.last_prompt(body)
            text = GREETING + prompt
            usage = Usage(input_tokens=10 + len(prompt) // 4, output_tokens=12 + len(prompt) // 4)
            return await self._send(request, record, _text_reply(model, text, usage))

        record.kind = "conversation"
        record.step = index = routing.step_index(body)
        if index >= len(script.steps):
            usage = Usage(input_tokens=100, output_tokens=8)
            return await self._send(request, record, _text_reply(model, FINISHED_TEXT, usage))
        step = script.steps[index]
        key = (request.headers.get(SESSION_HEADER, ""), record.script, index)
        record.attempt = self._attempts[key] = self._attempts.get(key, 0) + 1

        if step.delay_s > 0:
            await asyncio.sleep(step.delay_s)
        failure = step.failure_for(record.attempt)
        if failure is not None:
            return _failure_response(failure)
        if step.hang:
            await self._hold(request)
            return web.Response()  # never sent: the connection is gone
        return await self._send(request, record, step_reply(step, model, body), step)

    async def _send(
        self,
        request: web.Request,
        record: RecordedRequest,
        reply: Reply,
        step: Step | None = None,
    ) -> web.StreamResponse:
        """Answer ``record``'s request with ``reply``: SSE if it streams, JSON otherwise."""
        body = record.body or {}
        record.usage = reply.usage
        headers = {"request-id": new_id("req_")}
        if not body.get("stream"):
            return web.json_response(reply.message(), headers=headers)
        response = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        stall = step.stall_after_events if step else None
        drop = step.drop_after_events if step else None
        for count, (event, data) in enumerate(reply.events()):
            if count == stall:
                await self._hold(request)
                return response
            if count == drop:
                _abort(request)
                return response
            await response.write(encode_event(event, data))
        await response.write_eof()
        return response

    async def _hold(self, request: web.Request) -> None:
        """Hold the request until the server stops, then cut the connection.

        When the client goes away first, aiohttp cancels the handler (handler_cancellation).
        """
        await self._stopping.wait()
        _abort(request)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _failure_response(failure: HttpFailure) -> web.Response:
    body = failure.body()
    return error_response(
        failure.status, body["error"]["type"], body["error"]["message"], failure.headers()
    )


def _text_reply(model: str, text: str, usage: Usage) -> Reply:
    return Reply(
        model=model, content=[{"type": "text", "text": text}], stop_reason="end_turn", usage=usage
    )


def step_reply(step: Step, request_model: str, body: dict[str, Any] | None = None) -> Reply:
    """The assistant message a step answers `body` with (fresh ids for tool calls without
    one).

    Like the real API, it never reports more output than the request's `max_tokens`
    allows (a step scripted for more is cut there, with stop_reason "max_tokens"), nor
    more web searches than its web search tool's `max_uses`, nor any without one; each
    search it reports comes as a `server_tool_use` block and its result, before the text.
    """
    body = body or {}
    usage, stop_reason = step.usage, step.effective_stop_reason
    searches = usage.server_tool_use.get("web_search_requests", 0)
    if searches:
        allowed = routing.web_search_max_uses(body)
        if allowed is not None and allowed < searches:
            uses = {**usage.server_tool_use, "web_search_requests": allowed}
            usage = dataclasses.replace(usage, server_tool_use=uses)
            searches = allowed
    content: list[dict[str, Any]] = []
    query = routing.last_prompt(body)
    for _ in range(searches):
        content.extend(_web_search_blocks(query))
    if step.text is not None:
        content.append({"type": "text", "text": step.text})
    content.extend(_tool_use_block(call) for call in step.tool_calls)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and 0 < max_tokens < usage.output_tokens:
        usage = dataclasses.replace(usage, output_tokens=max_tokens)
        stop_reason = "max_tokens"
    return Reply(
        model=step.model or request_model, content=content, stop_reason=stop_reason, usage=usage
    )


def _web_search_blocks(query: str) -> list[dict[str, Any]]:
    """One search as the real API reports it: the call and its (one) result."""
    call_id = new_id("srvtoolu_")
    return [
        {"type": "server_tool_use", "id": call_id, "name": "web_search", "input": {"query": query}},
        {
            "type": "web_search_tool_result",
            "tool_use_id": call_id,
            "content": [
                {
                    "type": "web_search_result",
                    "title": "Sandbox search result",
                    "url": "https://sandbox.invalid/result",
                    "encrypted_content": "c2FuZGJveA==",
                    "page_age": None,
                }
            ],
        },
    ]


def _tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id or new_id("toolu_"),
        "name": call.name,
        "input": call.input,
    }
