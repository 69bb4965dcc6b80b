"""The built-in tools of the bundled Claude Code CLI, by name: what a tenant's
`allowed_tools` may list besides MCP tools (`mcp__<server>[__<tool>]`). The CLI silently
drops a name it does not have, so `check-config` and `serve` warn about one (a typo such
as "Globb" would leave the agent without the tool). tests/test_config.py pins this list
to what the bundled CLI offers in the environment sessions run with (no nonessential
traffic: tools behind the CLI's remote feature flags are off)."""

from __future__ import annotations

import difflib

BUILTIN_TOOLS = frozenset(
    {
        # Offered only to a client that answers prompts: the caller's loop (sessions/caller_loop/).
        "AskUserQuestion",
        "Bash",
        "CronCreate",
        "CronDelete",
        "CronList",
        "Edit",
        "EnterWorktree",
        "ExitWorktree",
        "Glob",
        "Grep",
        "ListAgents",
        "Monitor",
        "NotebookEdit",
        "Read",
        "ReportFindings",
        "ScheduleWakeup",
        "SendMessage",
        "Skill",
        "Task",
        "TaskCreate",
        "TaskGet",
        "TaskList",
        "TaskStop",
        "TaskUpdate",
        "ToolSearch",
        "WebFetch",
        "WebSearch",
        "Workflow",
        "Write",
    }
)
# Not in the CLI's list of tools when asked for all of them.
PROMPT_ONLY_TOOLS = frozenset({"AskUserQuestion"})


def closest_tool(name: str) -> str | None:
    """The built-in tool `name` most likely misspells (`Globb`, `bash`), if one is close."""
    lower = {tool.lower(): tool for tool in BUILTIN_TOOLS}
    found = difflib.get_close_matches(name.lower(), sorted(lower), n=1, cutoff=0.75)
    return lower[found[0]] if found else None
