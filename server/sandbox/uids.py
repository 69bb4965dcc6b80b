"""A host uid of its own for each live session, from a configured range (like systemd's
`DynamicUser=`).

A uid is held by an exclusive `flock` on `<lock dir>/<uid>`: every server of the host
(replicas included) takes its sessions' uids from the same folder, so no two live
sessions share one, and a server that dies (kill -9 too) lets go of its uids with its
file descriptors. The uids need no passwd entry; each is its own group too.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import random
import threading
from dataclasses import dataclass
from pathlib import Path

# 65,536 uids well above the ranges distributions give to users (1000-60000), systemd's
# dynamic users (61184-65519) and the first subordinate ranges of /etc/subuid (100000+
# in steps of 65536 for the first few users).
DEFAULT_RANGE = (3_000_000, 3_065_535)


class NoFreeUid(OSError):
    """Every uid of the range belongs to a live session."""


def parse_range(raw: str) -> tuple[int, int]:
    """`FIRST-LAST` (inclusive): a range of unprivileged uids, 1000 and above."""
    first, sep, last = raw.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise ValueError(f"{raw!r} is not FIRST-LAST (two whole numbers)")
    low, high = int(first), int(last)
    if not 1000 <= low <= high < 2**31 - 1:
        raise ValueError(f"{raw!r} is not a range of uids within 1000..2147483646")
    return low, high


def taken_by_users(low: int, high: int) -> list[str]:
    """The host's users (passwd entries) whose uid lies in low..high."""
    return sorted(entry.pw_name for entry in pwd.getpwall() if low <= entry.pw_uid <= high)


@dataclass(frozen=True)
class Lease:
    """One uid, held until `release`."""

    uid: int
    fd: int

    def release(self) -> None:
        try:
            os.close(self.fd)  # drops the flock
        except OSError:
            pass


class UidPool:
    """Hands out uids of `low..high` that no live session of this host holds."""

    def __init__(self, lock_dir: Path, low: int, high: int) -> None:
        self.lock_dir = lock_dir
        self.low, self.high = low, high
        self._lock = threading.Lock()
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = lock_dir.stat()
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise PermissionError(f"{lock_dir} is writable by another user")

    def acquire(self) -> Lease:
        """A free uid (NoFreeUid when the whole range is in use)."""
        size = self.high - self.low + 1
        # From a random point: uids are not reused at once, so what an agent left behind
        # (a key, a file in a shared place) meets another session as rarely as can be.
        start = random.randrange(size)
        with self._lock:
            for step in range(size):
                uid = self.low + (start + step) % size
                fd = os.open(
                    self.lock_dir / str(uid),
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return Lease(uid, fd)
        raise NoFreeUid(f"all {size} uids of {self.low}-{self.high} belong to live sessions")
