"""Which tool calls need the caller's approval: tool names and patterns on their input.

A rule is a tool's name (`Bash`, `Write`, a caller tool's name) or a name with a pattern
on the call's subject (`mcp__crm` for every tool of the MCP server crm): `Bash(git push:*)` (a command that starts with "git push"),
`Write(src/*)` (a path matching the glob, relative to the session's workspace), or any
other `Tool(glob)` on that tool's input as compact JSON.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

MAX_RULES = 32
MAX_RULE_CHARS = 256
_RULE = re.compile(r"([A-Za-z0-9_-]{1,128})(?:\((.+)\))?", re.ASCII | re.DOTALL)
# The input field each built-in tool acts on.
_SUBJECT = {
    "Bash": "command",
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "Read": "file_path",
    "NotebookEdit": "notebook_path",
    "Glob": "pattern",
    "Grep": "pattern",
    "WebFetch": "url",
}
_PATHS = {"file_path", "notebook_path"}


@dataclass(frozen=True)
class Rule:
    """One approval rule: a tool, and optionally a pattern on its subject."""

    tool: str
    pattern: str | None = None

    def matches(self, tool: str, tool_input: Mapping[str, Any], workspace: str) -> bool:
        # `mcp__crm` names every tool of the MCP server crm (mcp__crm__<tool>).
        server_wide = self.tool.startswith("mcp__") and "__" not in self.tool[5:]
        if tool != self.tool and not (server_wide and tool.startswith(f"{self.tool}__")):
            return False
        if self.pattern is None:
            return True
        subject = _subject(tool, tool_input, workspace)
        if self.pattern.endswith(":*"):
            return subject.startswith(self.pattern[:-2])
        return fnmatch.fnmatchcase(subject, self.pattern)

    def __str__(self) -> str:
        return self.tool if self.pattern is None else f"{self.tool}({self.pattern})"


def parse_rule(text: str) -> Rule:
    """A rule from its text; ValueError saying what is wrong."""
    if len(text) > MAX_RULE_CHARS:
        raise ValueError(f"a rule is at most {MAX_RULE_CHARS} characters")
    match = _RULE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            "a rule is a tool name, optionally with a pattern: Bash, Bash(git push:*), Write(src/*)"
        )
    return Rule(match.group(1), match.group(2))


def _subject(tool: str, tool_input: Mapping[str, Any], workspace: str) -> str:
    field = _SUBJECT.get(tool)
    value = tool_input.get(field) if field else None
    if not isinstance(value, str):
        return json.dumps(tool_input, sort_keys=True, separators=(",", ":"))
    if field in _PATHS:  # relative to the workspace, as a caller writes its patterns
        path = PurePosixPath(value)
        if path.is_absolute() and path.is_relative_to(workspace):
            return str(path.relative_to(workspace))
    return value


@dataclass(frozen=True)
class ApprovalPolicy:
    """The rules of one session (the tenant's and its request's)."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def of(cls, texts: Iterable[str]) -> ApprovalPolicy:
        return cls(tuple(parse_rule(text) for text in texts))

    def needs_approval(self, tool: str, tool_input: Mapping[str, Any], workspace: str) -> bool:
        return any(rule.matches(tool, tool_input, workspace) for rule in self.rules)

    @property
    def tools(self) -> set[str]:
        """The tools some rule names."""
        return {rule.tool for rule in self.rules}
