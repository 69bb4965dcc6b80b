"""The caller in an agent's loop: its tools, its approvals and its answers to questions.

What the SDK is given for a session that may wait for its caller:
- caller tools as an in-process MCP server (`mcp__caller__<name>`): each call becomes an
  input request, and the caller's result is the tool's result;
- a PreToolUse hook on every tool call: it notes the ids of caller-tool calls, and turns
  the calls the approval rules name, and AskUserQuestion, into permission prompts. A hook
  because the CLI runs read-only calls (`Read`, `Bash(echo ...)`) without any prompt;
- `can_use_tool`, which answers those prompts with the caller's decision (the agent reads
  a denial's message as the tool's result) or answers, and refuses any other prompt, as a
  headless CLI does. It also makes AskUserQuestion exist: the CLI offers that tool only to
  a client that answers prompts.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict, deque
from typing import Any

from claude_agent_sdk import (
    CanUseToolShadowedWarning,
    HookMatcher,
    McpServerConfig,
    SdkMcpTool,
    ToolAnnotations,
    create_sdk_mcp_server,
)
from claude_agent_sdk.types import (
    HookContext,
    PermissionResult,
    PermissionResultAllow,
    PermissionResultDeny,
    ToolPermissionContext,
)

from ...approvals import ApprovalPolicy
from ...domain import Decider, InputKind
from ..run_request import CALLER_PREFIX, CALLER_SERVER, CallerTool, SessionSpec
from .inputs import InputWaiter

QUESTION_TOOL = "AskUserQuestion"

# The allowed tools shadow `can_use_tool` on purpose: the hook sends it what it decides.
warnings.filterwarnings("ignore", category=CanUseToolShadowedWarning)


class CallerLoop:
    """One session's caller tools, hook and prompt answers (see the module docstring)."""

    def __init__(self, spec: SessionSpec, waiter: InputWaiter, workspace: str) -> None:
        self._spec = spec
        self._waiter = waiter
        self._workspace = workspace
        self._policy = ApprovalPolicy.of(spec.require_approval)
        # The ids of caller-tool calls the hook saw, by tool and input, for their handler
        # (the MCP call itself carries no id).
        self._call_ids: defaultdict[tuple[str, str], deque[str]] = defaultdict(deque)

    @property
    def tool_names(self) -> list[str]:
        """The caller tools as the agent names them."""
        return [CALLER_PREFIX + tool.name for tool in self._spec.caller_tools]

    def mcp_servers(self) -> dict[str, McpServerConfig]:
        if not self._spec.caller_tools:
            return {}
        tools = [self._tool(tool) for tool in self._spec.caller_tools]
        return {CALLER_SERVER: create_sdk_mcp_server(CALLER_SERVER, tools=tools)}

    def hooks(self) -> dict[Any, list[HookMatcher]]:
        return {
            "PreToolUse": [
                HookMatcher(
                    matcher=None,
                    hooks=[self._before_tool],  # type: ignore[list-item]
                    # A failing hook must not let a call through unapproved.
                    on_failure="block",
                )
            ]
        }

    def _tool(self, tool: CallerTool) -> SdkMcpTool[Any]:
        async def call(arguments: dict[str, Any]) -> dict[str, Any]:
            return await self._call(tool.name, arguments)

        # The SDK reads a dict without "properties" as a map of parameter names.
        schema = {"properties": {}, **tool.input_schema}
        # Read-only, so the CLI runs parallel calls at once: the caller may answer them in
        # any order.
        return SdkMcpTool(
            tool.name,
            tool.description,
            schema,
            call,
            annotations=ToolAnnotations(readOnlyHint=True),
        )

    async def _call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        ids = self._call_ids.get((name, _canonical(arguments)))
        tool_use_id = ids.popleft() if ids else ""
        answer = await self._waiter.ask(InputKind.TOOL_CALL, name, tool_use_id, arguments)
        if answer.decided_by is not Decider.CALLER:
            return _text(f"Error: {answer.message}", error=True)
        value = answer.value
        text = str(value.get("text", ""))
        structured = value.get("structured")
        if structured is not None:
            text = "\n".join(p for p in (text, json.dumps(structured, ensure_ascii=False)) if p)
        return _text(text, error=bool(value.get("is_error")))

    async def _before_tool(
        self, hook_input: dict[str, Any], tool_use_id: str | None, context: HookContext
    ) -> dict[str, Any]:
        name = str(hook_input.get("tool_name", ""))
        tool_input = _object(hook_input.get("tool_input"))
        if name.startswith(CALLER_PREFIX):
            key = (name.removeprefix(CALLER_PREFIX), _canonical(tool_input))
            self._call_ids[key].append(tool_use_id or "")
        if name == QUESTION_TOOL or self._needs_approval(name, tool_input):
            return {
                "hookSpecificOutput": {
                    "hookEventName": "PreToolUse",
                    "permissionDecision": "ask",
                    "permissionDecisionReason": "the caller decides",
                }
            }
        return {}  # no opinion: the session's allowed tools decide

    async def can_use_tool(
        self, name: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResult:
        """A permission prompt: the caller's decision or answers (see the module docstring)."""
        call_id = context.tool_use_id or ""
        if name == QUESTION_TOOL:
            return await self._question(call_id, tool_input)
        if self._needs_approval(name, tool_input):
            return await self._approval(_rule_name(name), call_id, tool_input)
        return PermissionResultDeny(message=f"{name} needs a permission this session lacks")

    def _needs_approval(self, name: str, tool_input: dict[str, Any]) -> bool:
        return self._policy.needs_approval(_rule_name(name), tool_input, self._workspace)

    async def _approval(
        self, name: str, tool_use_id: str, tool_input: dict[str, Any]
    ) -> PermissionResult:
        answer = await self._waiter.ask(InputKind.PERMISSION, name, tool_use_id, tool_input)
        if answer.decided_by is Decider.CALLER and answer.value.get("allow"):
            return PermissionResultAllow(updated_input=answer.value.get("updated_input"))
        if answer.decided_by is Decider.TIMEOUT:
            return PermissionResultDeny(message=f"Not approved: {answer.message}.")
        return PermissionResultDeny(message=answer.message or "denied by the caller")

    async def _question(self, tool_use_id: str, tool_input: dict[str, Any]) -> PermissionResult:
        answer = await self._waiter.ask(InputKind.QUESTION, QUESTION_TOOL, tool_use_id, tool_input)
        answers = answer.value.get("answers") if answer.decided_by is Decider.CALLER else None
        if not answers:
            return PermissionResultDeny(
                message=f"The questions went unanswered ({answer.message or answer.outcome})."
            )
        return PermissionResultAllow(updated_input={**tool_input, "answers": answers})


def _rule_name(name: str) -> str:
    """What approval rules call a tool: a caller tool by its own name."""
    return name.removeprefix(CALLER_PREFIX)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _text(text: str, *, error: bool) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "is_error": error}
