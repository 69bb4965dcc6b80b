"""Which script and step a Messages API request asks for (pure functions, no state)."""

from __future__ import annotations

import re
from typing import Any

from .script import Usage
from .sse import Reply

MARKER = re.compile(r"\[\[sandbox:([A-Za-z0-9_.\-]+)\]\]")

_CLI_BLOCK = re.compile(r"\s*<[a-z][a-z_-]*>")  # a text block the CLI wrote, not the user


def _texts_of(content: Any) -> list[str]:
    """The text blocks of a message's content (a string or a list of blocks)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [
        str(block.get("text", ""))
        for block in content
        if isinstance(block, dict) and block.get("type") == "text"
    ]


def _user_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]


def script_marker(body: dict[str, Any]) -> str | None:
    """The NAME of the first ``[[sandbox:NAME]]`` in the first user message, if any."""
    users = _user_messages(body)
    if not users:
        return None
    match = MARKER.search("\n".join(_texts_of(users[0].get("content"))))
    return match.group(1) if match else None


def step_index(body: dict[str, Any]) -> int:
    """The step a conversation request asks for: its number of assistant messages."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def last_prompt(body: dict[str, Any], limit: int = 200) -> str:
    """The latest user text, cut to ``limit`` chars.

    Blocks the CLI adds (``<system-reminder>``, ``<local-command-caveat>`` after a
    model switch, ...) and ``[[sandbox:NAME]]`` markers are left out.
    """
    for message in reversed(_user_messages(body)):
        for text in reversed(_texts_of(message.get("content"))):
            if _CLI_BLOCK.match(text):
                continue
            text = MARKER.sub("", text).strip()
            if text:
                return text[:limit]
    return ""


def web_search_max_uses(body: dict[str, Any]) -> int | None:
    """How many searches a request allows: the ``max_uses`` of its web search tool (None:
    no limit given); 0 when it offers no web search tool."""
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search_"):
            uses = tool.get("max_uses")
            return uses if isinstance(uses, int) and not isinstance(uses, bool) else None
    return 0


# Side requests: model calls of the CLI that are not a turn of the agent's conversation.
# Measured with the bundled CLI 2.1.331 and the mandatory env (nonessential traffic off):
# - A plain turn, tool turns, several queries per client, dropped streams, 500s, huge
#   usage numbers (no auto-compact even at 990k input tokens): conversation requests only.
# - `ClaudeSDKClient.set_model(m)` first validates m with a non-streaming probe:
#   max_tokens=1, no tools, system "You are Claude Code, ...", one user message "Hi".
#   The CLI's quota check ("quota_check", read in its source, not seen here) is the
#   same shape with the text "quota".
# - With CLAUDE_CODE_EMIT_TOOL_USE_SUMMARIES=1 the CLI asks for a label after each tool
#   batch: a "tool-free helper" request with `tools: []`, `temperature`, no
#   `context_management`, and the helper's own instructions in `system`. Session titles
#   (remote sessions) use the same helper. Conversation requests always carry
#   `context_management`, even with no tools and after set_model.
# - Forked side queries (prompt suggestions, away summaries, compaction) reuse the whole
#   conversation and could not be triggered in SDK mode with this env; they are not
#   told apart (they would be answered as the next step).
CLI_BILLING_PREFIX = "x-anthropic-billing-header"


def _system_texts(body: dict[str, Any]) -> list[str]:
    system = body.get("system")
    if isinstance(system, str):
        return [system]
    if isinstance(system, list):
        return [str(b.get("text", "")) for b in system if isinstance(b, dict)]
    return []


def is_side_request(body: dict[str, Any]) -> bool:
    """Whether a request is a CLI side request rather than a turn of the conversation.

    Probes (``max_tokens`` <= 1) from anyone, and the CLI's tool-free helpers (a CLI
    system prompt, no tools and no ``context_management``); see the notes above.
    """
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens <= 1:
        return True
    from_cli = any(t.startswith(CLI_BILLING_PREFIX) for t in _system_texts(body))
    return from_cli and not body.get("tools") and "context_management" not in body


def side_reply(body: dict[str, Any], model: str) -> Reply:
    """A minimal valid answer to a side request, with zero usage (it costs nothing)."""
    max_tokens = body.get("max_tokens")
    probe = isinstance(max_tokens, int) and max_tokens <= 1
    return Reply(
        model=model,
        content=[{"type": "text", "text": "Hi" if probe else "Sandbox"}],
        stop_reason="max_tokens" if probe else "end_turn",
        usage=Usage(),
    )
