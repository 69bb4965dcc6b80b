"""Finds and kills every process of a session, tools included.

The CLI starts its tools in sessions of their own, so neither its process group nor its
session reaches them once it dies. They all inherit the CLI's environment, though, and
every agentplane session's CLI gets its own AGENTPLANE_SESSION_DIR: that marks them
exactly. (CLAUDE_CONFIG_DIR would not: the SDK points it elsewhere on a resume.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

MARKER = "AGENTPLANE_SESSION_DIR"


def session_processes(session_dir: Path) -> list[int]:
    """Pids of live processes whose environment carries this AGENTPLANE_SESSION_DIR."""
    marker = f"{MARKER}={session_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return pids


def kill_session_processes(session_dir: Path) -> list[int]:
    """SIGKILL every process of the session; returns the pids it signalled."""
    pids = session_processes(session_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
