"""A tenant's MCP servers, as its tenants-file table `mcp_servers` declares them.

    [tenants.acme.mcp_servers.crm]            # tools: mcp__crm__<tool>
    type = "http"                             # or "sse"; remote, reached through the gateway
    url = "https://crm.internal/mcp"
    headers = { Authorization = { env = "CRM_TOKEN", prefix = "Bearer " }, X-Team = "acme" }

    [tenants.acme.mcp_servers.files]
    type = "stdio"                            # the default; runs inside the session's sandbox
    command = "/opt/files-mcp/bin/files-mcp"
    args = ["--read-only"]
    env = { LOG_LEVEL = "info" }
    paths = ["/opt/files-mcp"]                # host paths bound read-only into the sandbox

A header's or variable's value is a string, or `{env = NAME}` / `{file = PATH}` (with an
optional `prefix`), read when a session needs it: the tenants file never holds a secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ..errors import ConfigError

MAX_SERVERS = 16
# Tool names are mcp__<server>__<tool>: a server name cannot hold "__".
_SERVER = re.compile(r"[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*", re.ASCII)
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", re.ASCII)
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)
# What the sandbox launcher's word splitting leaves intact.
_PATH = re.compile(r"(/[A-Za-z0-9._@+-]+)+/?", re.ASCII)
# The in-process server of the caller's tools (mcp__caller__*).
RESERVED = frozenset({"caller"})
PREFIX = "mcp__"
# Where the metering gateway relays remote servers: `<gateway>/mcp/<name>/<path>`.
RELAY_ROUTE = "/mcp/"


class SecretUnavailable(Exception):
    """A value's variable is unset or its file unreadable (the message names which, never
    a value)."""


@dataclass(frozen=True)
class Value:
    """A header's or variable's value: literal, or read from a variable or a file."""

    literal: str | None = None
    env: str | None = None
    file: Path | None = None
    prefix: str = ""

    @property
    def secret(self) -> bool:
        return self.literal is None

    def resolve(self) -> str:
        """The value now (a rotated secret is read afresh); SecretUnavailable if missing."""
        if self.literal is not None:
            return self.literal
        if self.env is not None:
            found = os.environ.get(self.env)
            if not found:
                raise SecretUnavailable(f"the environment variable {self.env} is not set")
            return self.prefix + found
        assert self.file is not None
        try:
            text = self.file.read_text().strip()
        except OSError as exc:
            raise SecretUnavailable(f"cannot read {self.file} ({exc.strerror})") from None
        if not text:
            raise SecretUnavailable(f"{self.file} is empty")
        return self.prefix + text


@dataclass(frozen=True)
class StdioServer:
    """A server the CLI starts inside the session's sandbox."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, Value], ...] = ()
    # Host paths bound read-only into the sandbox (where the command and its files live).
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class RemoteServer:
    """A server at a URL, reached through the metering gateway's relay (`gateway/mcp_relay.py`)."""

    name: str
    transport: Literal["http", "sse"]
    url: str
    headers: tuple[tuple[str, Value], ...] = field(default=())

    @property
    def origin(self) -> str:
        """scheme://host:port of the URL: where the relay sends a session's requests."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def path(self) -> str:
        """The URL after its origin (path and query)."""
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


McpServer = StdioServer | RemoteServer


def relay_path(name: str) -> str:
    """Where the gateway's relay serves the server `name` (prefix of the agent's URL for it)."""
    return f"{RELAY_ROUTE}{name}"


def tool_server(name: str) -> str | None:
    """The server of an MCP tool name (`mcp__crm__lookup`) or server rule (`mcp__crm`)."""
    if not name.startswith(PREFIX):
        return None
    return name[len(PREFIX) :].split("__", 1)[0] or None


def covered(name: str, tools: Iterable[str]) -> bool:
    """Whether `name` (a tool, or `mcp__<server>` for all its tools) is among `tools`,
    where `mcp__<server>` stands for every tool of that server."""
    tools = set(tools)
    if name in tools:
        return True
    server = tool_server(name)
    return server is not None and name != f"{PREFIX}{server}" and f"{PREFIX}{server}" in tools


def problem(servers: Iterable[McpServer]) -> str | None:
    """What keeps a session from using `servers` now (a secret that cannot be read)."""
    for server in servers:
        pairs = server.headers if isinstance(server, RemoteServer) else server.env
        for name, value in pairs:
            try:
                value.resolve()
            except SecretUnavailable as exc:
                part = "header" if isinstance(server, RemoteServer) else "variable"
                return f"MCP server {server.name}: {part} {name}: {exc}"
    return None


def parse_servers(raw: Any, where: str) -> tuple[McpServer, ...]:
    """The `mcp_servers` table of a tenant; ConfigError naming the setting."""
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "must be a table of servers ([...mcp_servers.<name>])")
    if len(raw) > MAX_SERVERS:
        raise ConfigError(where, f"at most {MAX_SERVERS} servers")
    return tuple(_server(name, spec, f"{where}.{name}") for name, spec in raw.items())


def _server(name: str, raw: Any, where: str) -> McpServer:
    if not _SERVER.fullmatch(name) or len(name) > 64 or name in RESERVED:
        raise ConfigError(
            where,
            "server names are 1-64 chars of [A-Za-z0-9_-] without '__', "
            f"and not {', '.join(sorted(RESERVED))}",
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "must be a table")
    kind = raw.get("type", "stdio")
    keys = {
        "stdio": {"type", "command", "args", "env", "paths"},
        "http": {"type", "url", "headers"},
        "sse": {"type", "url", "headers"},
    }
    if kind not in keys:
        raise ConfigError(f"{where}.type", "must be stdio, http or sse")
    unknown = set(raw) - keys[kind]
    if unknown:
        raise ConfigError(f"{where}.{min(unknown)}", f"unknown setting for a {kind} server")
    if kind == "stdio":
        return _stdio(name, raw, where)
    url = raw.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if (
        not isinstance(url, str)
        or parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
    ):
        raise ConfigError(f"{where}.url", "must be an http:// or https:// URL")
    if parts.username or parts.password or parts.fragment:
        raise ConfigError(
            f"{where}.url", "must not hold credentials or a fragment (put secrets in headers)"
        )
    return RemoteServer(
        name, kind, url, _pairs(raw.get("headers", {}), f"{where}.headers", _HEADER, "header names")
    )


def _stdio(name: str, raw: Mapping[str, Any], where: str) -> StdioServer:
    command = raw.get("command")
    if not isinstance(command, str) or not command.startswith("/"):
        raise ConfigError(
            f"{where}.command", "must be an absolute path (the sandbox has no search of your PATH)"
        )
    args = raw.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{where}.args", "must be a list of strings")
    paths = raw.get("paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ConfigError(f"{where}.paths", "must be a list of absolute paths")
    for path in paths:
        # Not "/" (the whole host), no "." or ".." parts.
        if not _PATH.fullmatch(path) or {".", ".."} & set(path.split("/")):
            raise ConfigError(
                f"{where}.paths",
                f"{path!r}: an absolute path below / of "
                "[A-Za-z0-9._/@+-], without '.' or '..' parts",
            )
        if not os.path.exists(path):
            raise ConfigError(f"{where}.paths", f"{path} does not exist")
    env = _pairs(raw.get("env", {}), f"{where}.env", _VARIABLE, "variable names")
    return StdioServer(name, command, tuple(args), env, tuple(dict.fromkeys(paths)))


def _pairs(
    raw: Any, where: str, names: re.Pattern[str], what: str
) -> tuple[tuple[str, Value], ...]:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "must be a table of name = value")
    pairs = []
    for name, value in raw.items():
        if not names.fullmatch(name):
            raise ConfigError(f"{where}.{name}", f"not one of the {what} allowed")
        pairs.append((name, _value(value, f"{where}.{name}")))
    return tuple(pairs)


def _value(raw: Any, where: str) -> Value:
    if isinstance(raw, str):
        if "\n" in raw or "\r" in raw or "\0" in raw:
            raise ConfigError(where, "must not hold line breaks or NULs")
        return Value(literal=raw)
    if (
        not isinstance(raw, Mapping)
        or len({"env", "file"} & set(raw)) != 1
        or (set(raw) - {"env", "file", "prefix"})
    ):
        raise ConfigError(
            where,
            'must be a string, {env = "NAME"} or {file = "/path"} (optionally with prefix = "...")',
        )
    prefix = raw.get("prefix", "")
    if not isinstance(prefix, str):
        raise ConfigError(where, "prefix must be a string")
    if "env" in raw:
        if not isinstance(raw["env"], str) or not _VARIABLE.fullmatch(raw["env"]):
            raise ConfigError(where, "env must name an environment variable")
        return Value(env=raw["env"], prefix=prefix)
    if not isinstance(raw["file"], str) or not raw["file"].startswith("/"):
        raise ConfigError(where, "file must be an absolute path")
    return Value(file=Path(raw["file"]), prefix=prefix)
