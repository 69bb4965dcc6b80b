"""What one session may use, and which of those limits it hit."""

from __future__ import annotations

from dataclasses import dataclass

from ..domain import ErrorReason


@dataclass(frozen=True)
class SessionLimits:
    """Per-session resource limits (a tenant's, from the tenants file)."""

    # Memory of every process of the session, the files in its folder included (the
    # folder is a tmpfs: its pages count as the session's memory).
    memory_mib: int = 2048
    # Processes and threads at once (the CLI alone runs about 20 threads).
    processes: int = 256
    # CPU time of all the session's processes together.
    cpu_s: int = 600
    # Files in the session's folder and its /tmp.
    disk_mib: int = 512


@dataclass(frozen=True)
class Breach:
    """A limit a session hit: why it ends, in words a person can act on."""

    reason: ErrorReason
    message: str
