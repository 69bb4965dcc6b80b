"""The caller in an agent's loop: its tools, its approvals and its answers to questions.

What the SDK is given for a session that may wait for its caller:
- caller tools as an in-process MCP server (`mcp__caller__<name>`): each call becomes an
  input request, and the caller's result is the tool's result;
- one PreToolUse hook for every tool. It sees each call first, with its id: a call the
  approval rules name waits for the caller's decision (allow, allow with edited input,
  deny with a message the agent reads), and AskUserQuestion waits for the caller's
  answers. The hook, not `can_use_tool`, because the CLI runs read-only calls (`Read`,
  `Bash(echo ...)`) without asking for permission at all;
- with AskUserQuestion among its tools, a `can_use_tool` that refuses what reaches it:
  the CLI offers that tool only to a client that answers permission prompts, and the hook
  has decided every call by then (a prompt for anything else is what a headless CLI
  refuses anyway).
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
from claude_agent_sdk.types import HookContext, PermissionResultDeny, ToolPermissionContext

from ..approvals import ApprovalPolicy
from ..domain import Decider, InputAnswer, InputKind
from .inputs import InputWaiter
from .requests import CALLER_PREFIX, CALLER_SERVER, CallerTool, SessionSpec

QUESTION_TOOL = "AskUserQuestion"
# Beyond the longest wait, so the CLI never gives up on the hook before the waiter does.
HOOK_MARGIN_S = 60.0

# The allowed tools shadow `can_use_tool` on purpose (it only makes AskUserQuestion exist).
warnings.filterwarnings("ignore", category=CanUseToolShadowedWarning)


class CallerLoop:
    """One session's caller tools and hook (see the module docstring)."""

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
        return {"PreToolUse": [HookMatcher(
            matcher=None, hooks=[self._before_tool],  # type: ignore[list-item]
            timeout=self._waiter.timeout_s + HOOK_MARGIN_S,
            # A failing hook must not let a call through unapproved.
            on_failure="block",
        )]}

    @property
    def asks_questions(self) -> bool:
        return QUESTION_TOOL in self._spec.tools

    async def refuse_prompt(
        self, tool: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResultDeny:
        """`can_use_tool`: a permission prompt the hook did not settle is refused."""
        return PermissionResultDeny(message=f"{tool} needs a permission this session lacks")

    def _tool(self, tool: CallerTool) -> SdkMcpTool[Any]:
        async def call(arguments: dict[str, Any]) -> dict[str, Any]:
            return await self._call(tool.name, arguments)

        # Read-only, so the CLI runs parallel calls at once: the caller may answer them in
        # any order.
        return SdkMcpTool(tool.name, tool.description, tool.input_schema, call,
                          annotations=ToolAnnotations(readOnlyHint=True))

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
        tool_input = hook_input.get("tool_input")
        tool_input = tool_input if isinstance(tool_input, dict) else {}
        call_id = tool_use_id or ""
        caller_tool = name.removeprefix(CALLER_PREFIX) if name.startswith(CALLER_PREFIX) else None
        if caller_tool is not None:
            self._call_ids[(caller_tool, _canonical(tool_input))].append(call_id)
        if name == QUESTION_TOOL:
            return await self._question(call_id, tool_input)
        rule_name = caller_tool or name
        if self._policy.needs_approval(rule_name, tool_input, self._workspace):
            return await self._approval(rule_name, call_id, tool_input)
        return {}  # no opinion: the session's allowed tools decide

    async def _approval(
        self, name: str, tool_use_id: str, tool_input: dict[str, Any]
    ) -> dict[str, Any]:
        answer = await self._waiter.ask(InputKind.PERMISSION, name, tool_use_id, tool_input)
        if answer.decided_by is Decider.CALLER and answer.value.get("allow"):
            edited = answer.value.get("updated_input")
            return _decision("allow", "approved by the caller", edited)
        message = answer.message or "denied by the caller"
        if answer.decided_by is Decider.TIMEOUT:
            message = f"not approved: {answer.message}"
        return _decision("deny", message)

    async def _question(self, tool_use_id: str, tool_input: dict[str, Any]) -> dict[str, Any]:
        answer = await self._waiter.ask(InputKind.QUESTION, QUESTION_TOOL, tool_use_id, tool_input)
        answers = answer.value.get("answers") if answer.decided_by is Decider.CALLER else None
        if not answers:
            return _decision("deny", f"the caller gave no answers ({_why(answer)})")
        return _decision("allow", "answered by the caller", {**tool_input, "answers": answers})


def _why(answer: InputAnswer) -> str:
    return answer.message or answer.outcome


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _text(text: str, *, error: bool) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "is_error": error}


def _decision(
    behaviour: str, reason: str, updated_input: dict[str, Any] | None = None
) -> dict[str, Any]:
    output: dict[str, Any] = {
        "hookEventName": "PreToolUse", "permissionDecision": behaviour,
        "permissionDecisionReason": reason,
    }
    if updated_input is not None:
        output["updatedInput"] = updated_input
    return {"hookSpecificOutput": output}
