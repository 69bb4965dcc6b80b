"""The server-side tools a Messages request offers, and the uses the gateway lets it have.

Upstream runs a server tool itself and bills each use on top of the tokens (a web
search), so the gateway reserves for the uses a request allows and bounds them: it finds
the metered server tools in ``tools`` (by their ``type``), caps each tool's ``max_uses``
at the session's per-request maximum (setting it on a tool that has none), and checks the
tool against the session's tools (``WebSearch`` offers ``web_search``, ``WebFetch``
offers ``web_fetch``). Other server tools pass through unchanged; what they report in
``usage.server_tool_use`` is still metered (see pricing.ModelPrice).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

# Tool type prefix -> (the usage object's count of its uses, the agent tool that allows it).
METERED = {
    "web_search_": ("web_search_requests", "WebSearch"),
    "web_fetch_": ("web_fetch_requests", "WebFetch"),
}


@dataclass(frozen=True)
class OfferedTool:
    """One metered server tool in a request's ``tools``: at ``index``, counted as
    ``unit``, allowed by the agent tool ``allowed_by``; ``requested`` is its own
    ``max_uses`` (None: absent or not a positive integer)."""

    index: int
    type: str
    unit: str
    allowed_by: str
    requested: int | None

    def uses(self, cap: int) -> int:
        """The uses it is forwarded with: its own max_uses, at most ``cap``."""
        return min(self.requested or cap, cap)


def offered(body: Mapping[str, Any]) -> list[OfferedTool]:
    """The metered server tools of a request, in the order of its ``tools``."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    found = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            continue
        for prefix, (unit, allowed_by) in METERED.items():
            if kind.startswith(prefix):
                asked = tool.get("max_uses")
                positive = isinstance(asked, int) and not isinstance(asked, bool) and asked > 0
                found.append(
                    OfferedTool(index, kind, unit, allowed_by, asked if positive else None)
                )
    return found


def not_allowed(tools: list[OfferedTool], session_tools: Collection[str]) -> OfferedTool | None:
    """The first tool the session's tools do not allow, if any."""
    return next((tool for tool in tools if tool.allowed_by not in session_tools), None)


def with_max_uses(body: dict[str, Any], uses: Mapping[int, int]) -> dict[str, Any]:
    """``body`` with ``max_uses`` of the tools at the given indexes set (a copy; the
    original is left alone)."""
    tools = list(body["tools"])
    for index, count in uses.items():
        tools[index] = {**tools[index], "max_uses": count}
    return {**body, "tools": tools}
