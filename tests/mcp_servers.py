"""Real MCP servers for the tests, built with the official `mcp` package.

    python mcp_servers.py stdio              # crm: lookup, delete, region (stdin/stdout)
    python mcp_servers.py http PORT LOG      # remote: ping (streamable HTTP at /mcp)
    python mcp_servers.py sse PORT LOG       # legacy: echo (SSE at /sse)

The HTTP servers append each request's headers to LOG as a JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer


def crm() -> MCPServer:
    server = MCPServer("crm")

    @server.tool()
    def lookup(email: str) -> str:
        """Look a customer up by email."""
        return f"customer {email}: Ada Lovelace, plan pro"

    @server.tool()
    def delete(email: str) -> str:
        """Delete a customer."""
        return f"deleted {email}"

    @server.tool()
    def region() -> str:
        """The region this server serves (from its environment)."""
        return f"region={os.environ.get('CRM_REGION', '(unset)')}"

    return server


def remote(kind: str) -> MCPServer:
    server = MCPServer(kind)

    @server.tool()
    def ping(x: str) -> str:
        """Answer pong."""
        return f"pong {x}"

    @server.tool()
    def echo(x: str) -> str:
        """Echo the input."""
        return f"echo {x}"

    return server


def serve_http(kind: str, port: int, log: str) -> None:
    import uvicorn

    server = remote(kind)
    app: Any = server.sse_app() if kind == "sse" else server.streamable_http_app()

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            line = json.dumps({"path": scope["path"], "headers": headers}) + "\n"
            with Path(log).open("a") as f:  # noqa: ASYNC230 - a test's log, one short line
                f.write(line)
        await app(scope, receive, send)

    uvicorn.run(recording, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        crm().run()
    else:
        serve_http(sys.argv[1], int(sys.argv[2]), sys.argv[3])
