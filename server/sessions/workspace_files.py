"""Files in and out of a session's workspace: a request's input files, written before the
agent starts, and the artifacts kept when it ends (what it created or changed).

Both run on the host, in a folder an agent wrote to: nothing here follows a symlink.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ..domain import Artifact
from ..tenants import FileLimits
from .requests import InputFile

# What a file looked like before the agent ran: a changed one differs in one of these.
Stamp = tuple[int, int, int]


def write_input_files(cwd: Path, files: Sequence[InputFile], owner: tuple[int, int] | None) -> None:
    """Write each file below `cwd`, making its folders; OSError if a path component is a
    symlink or not a folder (requests.py refuses those of the template at admission)."""
    for file in files:
        *folders, name = file.path.split("/")
        fd = os.open(cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for folder in folders:
                try:
                    os.mkdir(folder, 0o700, dir_fd=fd)
                    if owner is not None:
                        os.chown(folder, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            out = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=fd
            )
            with os.fdopen(out, "wb") as written:
                written.write(file.content)
                if owner is not None:
                    os.fchown(written.fileno(), *owner)
        finally:
            os.close(fd)


def snapshot(cwd: Path) -> dict[str, Stamp]:
    """Every regular file below `cwd` with its size, mtime and inode."""
    return {path: (st.st_size, st.st_mtime_ns, st.st_ino) for path, st in _walk(cwd)}


def collect_artifacts(cwd: Path, before: dict[str, Stamp], limits: FileLimits) -> list[Artifact]:
    """The files below `cwd` that are new or changed since `before`, by path: their
    content within `limits`, else the reason each was left out (symlinks are left out)."""
    found: list[Artifact] = []
    kept = total = 0
    for path, st in sorted(_walk(cwd, with_links=True), key=lambda item: item[0]):
        if stat.S_ISLNK(st.st_mode):
            found.append(Artifact(path, 0, omitted_reason="a symbolic link"))
            continue
        if before.get(path) == (st.st_size, st.st_mtime_ns, st.st_ino):
            continue
        reason = ""
        if kept >= limits.max_artifacts:
            reason = f"more than the tenant's max_artifacts ({limits.max_artifacts})"
        elif st.st_size > limits.max_artifact_bytes:
            reason = (
                f"larger than the tenant's max_artifact_mib ({limits.max_artifact_bytes >> 20})"
            )
        elif total + st.st_size > limits.max_artifacts_total_bytes:
            reason = (
                "over the tenant's max_artifacts_total_mib "
                f"({limits.max_artifacts_total_bytes >> 20})"
            )
        if reason:
            found.append(Artifact(path, st.st_size, omitted_reason=reason))
            continue
        content = _read(cwd / path)
        if content is None:
            found.append(Artifact(path, st.st_size, omitted_reason="could not be read"))
            continue
        kept += 1
        total += len(content)
        found.append(Artifact(path, len(content), hashlib.sha256(content).hexdigest(), content))
    return found


def _walk(root: Path, *, with_links: bool = False) -> list[tuple[str, os.stat_result]]:
    """(relative path, lstat) of the regular files (and symlinks, if asked) below root."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in [*files, *dirs]:
            full = Path(folder) / name
            try:
                st = full.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) or (with_links and stat.S_ISLNK(st.st_mode)):
                found.append((str(full.relative_to(root)), st))
    return found


def _read(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        return file.read()
