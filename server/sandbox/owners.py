"""Which server owns a session folder: a marker naming the server's pid and that pid's
start time (so a pid reused by another process does not pass for the owner)."""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' when it is gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22; the command name (field 2, in parentheses) may itself hold spaces.
    return stat_line.rpartition(")")[2].split()[19]


@functools.cache
def _mark_of(pid: int) -> str:
    return f"{pid} {_start_time(pid)}"


def write_marker(path: Path) -> None:
    """Mark `path` as this server's, atomically: a sweep running meanwhile must never
    read a marker half written (it would take a live folder for an orphan)."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(_mark_of(os.getpid()))  # (keyed by pid: a forked child is not us)
    tmp.replace(path)


def owner_alive(path: Path) -> bool:
    """Whether the server the marker names still runs (False for no or a bad marker)."""
    # Read at most a few bytes of a regular file, never through a symlink (to /dev/zero,
    # say) or from a FIFO: an agent of an unsandboxed server can write there.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            fields = os.read(fd, 64).split()
        finally:
            os.close(fd)
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return False
    if pid == os.getpid():
        return True
    started = _start_time(pid)
    if not started:
        return False
    return len(fields) < 2 or fields[1].decode(errors="replace") == started
