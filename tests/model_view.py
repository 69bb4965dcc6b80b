"""What the sandbox model was sent: the tool results it saw, for tests of callers in the loop
(a caller's answer has reached the agent only if the model's next request carries it)."""

from __future__ import annotations

import json
from typing import Any

from agentplane.server.model_double import SandboxServer

# The script steps of the tests of callers in the loop: a caller tool, a tool that needs
# approval, and the agent's question, each with a fixed tool_use id to find its result by.
LOOKUP_ID = "toolu_caller_lookup"
BASH_ID = "toolu_caller_bash"
ASK_ID = "toolu_caller_ask"
QUESTION = "Which fruit should the report cover?"
# A command whose output is not in its input: seeing the output proves it ran.
BASH_COMMAND = "echo approved-$((6*7))"
BASH_OUTPUT = "approved-42"


def question_input(multi_select: bool = False) -> dict[str, Any]:
    """AskUserQuestion's input: one question with two options."""
    return {
        "questions": [
            {
                "question": QUESTION,
                "header": "Fruit",
                "multiSelect": multi_select,
                "options": [
                    {"label": "Papaya", "description": "the magic word"},
                    {"label": "Mango", "description": "another fruit"},
                ],
            }
        ]
    }


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            _text(block.get("text", block)) if isinstance(block, dict) else str(block)
            for block in content
        )
    return json.dumps(content)


def tool_results_seen(sandbox: SandboxServer, script: str) -> dict[str, tuple[str, bool]]:
    """tool_use_id -> (the result's text, is_error) of every tool result the model was
    sent in the conversation requests of `script`."""
    seen: dict[str, tuple[str, bool]] = {}
    for request in sandbox.find(kind="conversation", script=script):
        for message in (request.body or {}).get("messages", []):
            content = message.get("content")
            if message.get("role") != "user" or not isinstance(content, list):
                continue
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    seen[block["tool_use_id"]] = (
                        _text(block.get("content", "")),
                        bool(block.get("is_error", False)),
                    )
    return seen


def tools_offered(sandbox: SandboxServer, script: str) -> set[str]:
    """The names of the tools the model was offered in `script`'s first request."""
    requests = sandbox.find(kind="conversation", script=script)
    body = requests[0].body or {} if requests else {}
    return {tool.get("name", "") for tool in body.get("tools", [])}
