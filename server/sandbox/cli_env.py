"""The environment every agent CLI process runs with.

The bundled Claude Code CLI phones home, writes under /tmp and $HOME, and picks up
whatever the server's own environment holds unless told otherwise. Everything here was
measured against the CLI shipped with claude-agent-sdk 0.2.188: with these variables it
sends nothing but model requests to ANTHROPIC_BASE_URL, and writes only under the
session's own folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Stops all traffic except model requests to ANTHROPIC_BASE_URL (without the first one the
# CLI resolves api.anthropic.com and sends `HEAD /api/hello` even with a custom base URL).
NO_OUTBOUND_TRAFFIC: Mapping[str, str] = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
}

# The CLI makes a unix socket under its tmp dir; the kernel limit on such a path is 108
# bytes and the CLI adds up to ~5 of its own, so the folder must stay short.
MAX_SOCKET_DIR_BYTES = 80

# Variables of the server's own environment that must never reach an agent process: the
# SDK merges os.environ under ours, so each is overridden with an empty value.
_ALWAYS_SCRUBBED = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "AGENTPLANE_DATABASE_URL")


@dataclass(frozen=True)
class SessionDirs:
    """The folders of one session: the agent's cwd and the CLI's private state."""

    root: Path

    @property
    def cwd(self) -> Path:
        return self.root / "work"

    @property
    def home(self) -> Path:
        return self.root / "h"

    @property
    def config(self) -> Path:
        return self.root / "h" / ".claude"

    @property
    def tmp(self) -> Path:
        return self.root / "t"

    def create(self, owner: tuple[int, int] | None = None) -> None:
        """Make every folder (not the parent of `root`), mode 0700, owned by `owner` (a
        uid and gid) when given."""
        self.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.root, self.cwd, self.home, self.config, self.tmp):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
            if owner is not None:
                os.chown(path, *owner)


def cli_environment(
    dirs: SessionDirs,
    *,
    base_url: str | None,
    api_key: str,
    scrub: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return the env for one session's CLI (passed as ClaudeAgentOptions.env).

    ``scrub`` names further variables of the server's environment (other tenants' key
    variables, say) that are blanked so they cannot leak into the agent process.
    """
    if len(os.fsencode(str(dirs.tmp))) > MAX_SOCKET_DIR_BYTES:
        raise ValueError(
            f"session folder {dirs.tmp} is longer than {MAX_SOCKET_DIR_BYTES} bytes; "
            "use a shorter AGENTPLANE_WORK_DIR"
        )
    env = {name: "" for name in (*_ALWAYS_SCRUBBED, *scrub) if name in os.environ}
    env.update(NO_OUTBOUND_TRAFFIC)
    env.update(
        {
            # Marks every process of the session, tools included (see reaper.py).
            "AGENTPLANE_SESSION_DIR": str(dirs.root),
            "HOME": str(dirs.home),
            "CLAUDE_CONFIG_DIR": str(dirs.config),
            "CLAUDE_CODE_TMPDIR": str(dirs.tmp),
            "TMPDIR": str(dirs.tmp),
            "ANTHROPIC_API_KEY": api_key,
        }
    )
    if base_url:
        env["ANTHROPIC_BASE_URL"] = base_url
    if extra:
        env.update(extra)
    return env
