"""Finds and kills every process of a session, tools included.

The CLI starts its tools in sessions of their own, so neither its process group nor its
session reaches them once it dies. They all inherit the CLI's environment, though, and
every agentplane session has its own CLAUDE_CONFIG_DIR: that marks them exactly.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def session_processes(config_dir: Path) -> list[int]:
    """Pids of live processes whose environment carries this CLAUDE_CONFIG_DIR."""
    marker = f"CLAUDE_CONFIG_DIR={config_dir}".encode()
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


def kill_session_processes(config_dir: Path) -> list[int]:
    """SIGKILL every process of the session; returns the pids it signalled."""
    pids = session_processes(config_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
