"""How this process names its connections to PostgreSQL, so that an operator sees in
pg_stat_activity which replica holds each one and what for."""

from __future__ import annotations

import os
import socket

# PostgreSQL keeps the first NAMEDATALEN - 1 bytes of an application_name.
_MAX_BYTES = 63


def application_name(purpose: str) -> str:
    """`agentplane/<host>/<pid>/<purpose>` (the host cut to fit; ASCII only, as
    PostgreSQL shows other characters as `?` anyway)."""
    tail = f"/{os.getpid()}/{purpose}"
    room = max(_MAX_BYTES - len("agentplane/") - len(tail.encode()), 0)
    host = socket.gethostname().encode("ascii", "replace").decode()[:room]
    return f"agentplane/{host}{tail}"
