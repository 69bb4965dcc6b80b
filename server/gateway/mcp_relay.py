"""The gateway's relay to tenants' remote MCP servers.

A sandboxed agent's one way out is the metering gateway, so its CLI reaches a remote MCP
server `crm` at `<gateway>/mcp/crm/<path>`, authenticated by its session token. The relay
forwards the request to that server's origin, for the servers of that session only, with
the tenant's headers (secrets read now, never logged or shown to the agent), and streams
the answer back (JSON, or SSE for as long as the server keeps it open). For an `sse`
server, the `endpoint` event that tells the client where to POST is rewritten to point
through the relay again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..mcp.servers import RELAY_ROUTE as ROUTE
from ..mcp.servers import RemoteServer, SecretUnavailable, relay_path

log = logging.getLogger(__name__)

# Never forwarded: hop-by-hop headers, the session's token, and what aiohttp sets itself.
_DROP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "x-api-key",
        "authorization",
        "accept-encoding",
    }
)
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


async def forward(
    request: web.Request,
    body: bytes,
    http: aiohttp.ClientSession,
    servers: Mapping[str, RemoteServer],
    session_id: str,
) -> web.StreamResponse:
    """Relay one request of a session's CLI to its MCP server (see the module docstring).
    `body`: the request's body, read by the gateway within its bounds."""
    name, _, rest = request.raw_path[len(ROUTE) :].partition("/")
    server = servers.get(name)
    if server is None:  # another tenant's, or none: the same answer
        return web.json_response({"error": f"no MCP server {name!r} for this session"}, status=404)
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST
    )
    headers["accept-encoding"] = "identity"  # the SSE rewrite reads the bytes
    try:
        for header, value in server.headers:
            headers[header] = value.resolve()
    except SecretUnavailable as exc:
        log.warning(
            "mcp_relay_failed",
            extra={"session_id": session_id, "server": name, "detail": f"header {header}: {exc}"},
        )
        return web.json_response(
            {"error": f"MCP server {name}: header {header} is not available"}, status=502
        )
    url = URL(server.origin + "/" + rest, encoded=True)
    response: web.StreamResponse | None = None
    try:
        async with http.request(
            request.method, url, data=body or None, headers=headers, allow_redirects=False
        ) as up:
            response = web.StreamResponse(
                status=up.status,
                reason=up.reason,
                headers=CIMultiDict(
                    (k, v) for k, v in up.headers.items() if k.lower() not in _DROP_RESPONSE
                ),
            )
            await response.prepare(request)
            rewrite = server.transport == "sse" and up.content_type == "text/event-stream"
            pending = b""
            while chunk := await up.content.readany():
                if rewrite:  # until the first event (the endpoint) is through
                    pending += chunk
                    if b"\n\n" not in pending.replace(b"\r\n", b"\n"):
                        continue
                    chunk, pending, rewrite = _endpoint(pending, server), b"", False
                await response.write(chunk)
            if pending:
                await response.write(pending)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        # What failed is logged (no header, no secret); the CLI sees the server as failed.
        log.warning(
            "mcp_relay_failed",
            extra={"session_id": session_id, "server": name, "detail": type(exc).__name__},
        )
        if response is not None:  # broke off mid-answer: break the CLI's the same way
            if request.transport is not None:
                request.transport.abort()
            return response
        return web.json_response(
            {"error": f"MCP server {name} cannot be reached ({type(exc).__name__})"}, status=502
        )
    except ConnectionError:  # the CLI went away
        return response or web.StreamResponse()


def _endpoint(head: bytes, server: RemoteServer) -> bytes:
    """The SSE stream's first bytes with its `endpoint` event's URL through the relay."""
    text = head.decode("utf-8", "replace")
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    if not any(line.strip() == "event: endpoint" for line in lines[:end]):
        return head
    out = []
    for line in lines[:end]:
        if line.startswith("data:"):
            target = line[5:].strip()
            target = target.removeprefix(server.origin)
            if target.startswith("/"):
                target = relay_path(server.name) + target
            line = f"data: {target}{line[len(line.rstrip(chr(13) + chr(10))) :]}"
        out.append(line)
    return "".join(out + lines[end:]).encode()
