"""The `mcp_servers` the SDK gives one session's CLI, from its tenant's declarations.

Only the servers some tool of the session belongs to are configured. A stdio server runs
as declared (inside the sandbox); its secret variables reach it through the CLI's
environment (the CLI expands `${NAME}` in its MCP configuration), never on a command line.
A remote server is configured at the gateway's relay, authenticated by the session's
gateway token (its ANTHROPIC_API_KEY, also in TOKEN_VARIABLE: the CLI does not expand
ANTHROPIC_API_KEY itself): the tenant's headers stay in the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .servers import McpServer, RemoteServer, StdioServer, relay_path, tool_server

# The CLI's variable holding its session's gateway token, for the relay's x-api-key.
TOKEN_VARIABLE = "AGENTPLANE_MCP_TOKEN"


@dataclass
class CliServers:
    """What the CLI gets: its `mcp_servers`, and variables for its environment."""

    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    # Host paths to bind read-only into the sandbox.
    paths: list[str] = field(default_factory=list)


def session_servers(tools: Iterable[str], servers: Iterable[McpServer]) -> list[McpServer]:
    """The servers some of `tools` (mcp__<server>[__<tool>]) belong to, in declared order."""
    wanted = {tool_server(tool) for tool in tools}
    return [server for server in servers if server.name in wanted]


def cli_servers(servers: Iterable[McpServer], gateway_url: str, token: str) -> CliServers:
    """The CLI's configuration of `servers` (see the module docstring); `token` is the
    session's gateway token. Resolves the stdio servers' secrets now (SecretUnavailable if
    one is missing)."""
    out = CliServers()
    for i, server in enumerate(servers):
        if isinstance(server, RemoteServer):
            out.env[TOKEN_VARIABLE] = token
            out.config[server.name] = {
                "type": server.transport,
                "url": gateway_url + relay_path(server.name) + server.path,
                "headers": {"x-api-key": f"${{{TOKEN_VARIABLE}}}"},
            }
            continue
        assert isinstance(server, StdioServer)
        env = {}
        for j, (name, value) in enumerate(server.env):
            if value.secret:
                variable = f"AGENTPLANE_MCP_{i}_{j}"
                out.env[variable] = value.resolve()
                env[name] = f"${{{variable}}}"
            else:
                env[name] = value.resolve()
        out.config[server.name] = {
            "type": "stdio",
            "command": server.command,
            "args": list(server.args),
            "env": env,
        }
        out.paths += server.paths
    return out
