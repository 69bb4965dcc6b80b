"""The work dirs of the agentplane servers on this host, listed in a host-wide folder, so
that whichever server starts next removes what a dead one left in its own work dir."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def default_host_dir() -> Path:
    """`/run/agentplane` for root; otherwise a folder of this user's in the temp dir."""
    if os.geteuid() == 0:
        return Path("/run/agentplane")
    return Path(tempfile.gettempdir()) / f"agentplane-{os.getuid()}"


def register(host_dir: Path, work_dir: Path) -> list[Path]:
    """List `work_dir` in `host_dir`; returns every listed work dir that still exists
    (those gone are dropped). A host dir that another user could write is not used."""
    listing = host_dir / "work-dirs"
    try:
        listing.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = host_dir.stat()
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            log.warning("host_dir_unsafe", extra={"path": str(host_dir)})
            return [work_dir]
        entry = listing / hashlib.sha256(str(work_dir).encode()).hexdigest()[:16]
        if not entry.exists():
            tmp = entry.with_suffix(f".{os.getpid()}")
            tmp.write_text(str(work_dir))
            tmp.replace(entry)
        found = []
        for path in listing.iterdir():
            if path.suffix:  # another server's entry still being written
                continue
            listed = Path(path.read_text())
            if listed.is_dir():
                found.append(listed)
            else:
                path.unlink(missing_ok=True)
        return found
    except OSError as exc:
        log.warning("host_dir_unusable", extra={"path": str(host_dir), "error": str(exc)})
        return [work_dir]
