"""Configuration that is accepted but likely a mistake: `AGENTPLANE_*` variables no
setting reads (a misspelled one is otherwise ignored), tools in a tenant's
`allowed_tools` the agent CLI does not have (it drops them silently), amounts written as
strings. `check-config` prints them, `serve` and `dev` log them at start: one line each."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from agentplane import TARGET_ENV, TOKEN_ENV

from .builtin_tools import BUILTIN_TOOLS, closest_tool
from .config import SETTINGS
from .mcp.servers import PREFIX as MCP_PREFIX

PREFIX = "AGENTPLANE_"
# The client's variables (the `agentplane` CLI): often set in the same shell.
CLIENT_VARIABLES = frozenset({TARGET_ENV, TOKEN_ENV})
# The test suite's and the benchmarks' own variables (tests/, tests/bench/).
DEVELOPMENT_PREFIXES = ("AGENTPLANE_TEST_", "AGENTPLANE_BENCH_")
# Amounts tenants/schema.py reads from a string as well, where a number is meant.
MONEY_KEYS = ("daily_limit_usd", "max_session_budget_usd")


def unknown_variables(env: Mapping[str, str], also_known: Iterable[str] = ()) -> list[str]:
    """A line per `AGENTPLANE_*` variable of `env` that no setting reads, naming the
    closest one that does. `also_known`: variables the tenants file names (keys)."""
    settings = sorted(s.env for s in SETTINGS if s.env.startswith(PREFIX))
    known = {*settings, *CLIENT_VARIABLES, *also_known}
    lines = []
    for name in sorted(env):
        if not name.startswith(PREFIX) or name in known or name.startswith(DEVELOPMENT_PREFIXES):
            continue
        # Compared without the prefix every candidate shares, which would make all close.
        close = difflib.get_close_matches(
            name.removeprefix(PREFIX), [s.removeprefix(PREFIX) for s in settings], n=1
        )
        hint = (
            f"did you mean {PREFIX}{close[0]}?"
            if close
            else "`agentplane-server --help` lists the settings"
        )
        lines.append(f"{name} is not an agentplane setting (ignored); {hint}")
    return lines


def tenants_file_warnings(path: Path) -> list[str]:
    """A line per unknown tool name and per amount written as a string in the tenants
    file `path` (already checked: TenantRegistry.load)."""
    tenants = tomllib.loads(path.read_text()).get("tenants", {})
    lines = []
    for name, raw in tenants.items():
        for tool in raw.get("allowed_tools", []):
            if tool.startswith(MCP_PREFIX) or tool in BUILTIN_TOOLS:
                continue
            close = closest_tool(tool)
            hint = (
                f"did you mean {close!r}?"
                if close
                else f"its tools are {', '.join(sorted(BUILTIN_TOOLS))}"
            )
            lines.append(
                f"tenant {name!r}: allowed_tools: {tool!r} is not a tool of the agent CLI, "
                f"which ignores it; {hint}"
            )
        for key in MONEY_KEYS:
            value = raw.get(key)
            if isinstance(value, str):
                lines.append(
                    f"tenant {name!r}: {key} = {value!r} is a string; write the number "
                    f"without quotes ({key} = {value.strip()})"
                )
    return lines
