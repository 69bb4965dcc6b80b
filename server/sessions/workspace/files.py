"""Files in and out of a session's workspace: a request's input files, written before the
agent starts, and the artifacts kept when it ends (what it created or changed).

Both run on the host, as root, in a folder an agent controls: every path is opened one
component at a time below the server's work dir, never following a symlink (`beneath.py`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ...domain import Artifact
from ...tenants import FileLimits
from ..run_request import InputFile
from .beneath import Listing, SymlinkInPath, open_folder, open_folder_at, read_file, walk

log = logging.getLogger(__name__)

# What a file looked like before the agent ran: a changed one differs in one of these.
Stamp = tuple[int, int, int]
# The reason a symlink is listed with (it is never read).
SYMLINK = "symlink"
# The artifact path of notes about the workspace as a whole.
WORKSPACE = "."
# How far a walk of the workspace goes: folders deep, and entries (files, folders, links).
MAX_DEPTH = 64
MAX_ENTRIES = 100_000
# Files left out that are listed one by one; past that, one note says how many more.
MAX_LEFT_OUT = 1000


def write_input_files(
    base: Path, cwd: Path, files: Sequence[InputFile], owner: tuple[int, int] | None
) -> None:
    """Write each file below `cwd` (a folder below the work dir `base`), making its
    folders. OSError if a path component is a symlink or not a folder (run_request.py refuses
    those of the template at admission). Whatever holds a file's name already (a template
    file; a link, FIFO or hard link an earlier agent left) is unlinked, not written
    through: each file is created anew (O_EXCL)."""
    top = open_folder(base, cwd)
    try:
        for file in files:
            *folders, name = file.path.split("/")
            fd = os.dup(top)
            try:
                for folder in folders:
                    made = _make_folder(fd, folder)
                    inner = open_folder_at(fd, [folder])
                    os.close(fd)
                    fd = inner
                    if made and owner is not None:
                        os.fchown(fd, *owner)
                out = _create(fd, name)
            finally:
                os.close(fd)
            with os.fdopen(out, "wb") as written:
                if owner is not None:
                    os.fchown(written.fileno(), *owner)
                written.write(file.content)
    finally:
        os.close(top)


def _make_folder(dir_fd: int, name: str) -> bool:
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        return False
    return True


def _create(dir_fd: int, name: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(name, dir_fd=dir_fd)  # the name itself, never what it points to
        return os.open(name, flags, 0o600, dir_fd=dir_fd)


def snapshot(base: Path, cwd: Path) -> dict[str, Stamp]:
    """Every regular file below `cwd` (below the work dir `base`) with its size, mtime
    and inode."""
    top = open_folder(base, cwd)
    try:
        listing = walk(top, max_depth=MAX_DEPTH, max_entries=MAX_ENTRIES)
    finally:
        os.close(top)
    return {
        path: (st.st_size, st.st_mtime_ns, st.st_ino)
        for path, st in listing.entries
        if stat.S_ISREG(st.st_mode)
    }


def collect_artifacts(
    base: Path, cwd: Path, before: dict[str, Stamp], limits: FileLimits
) -> list[Artifact]:
    """The files below `cwd` (below the work dir `base`) that are new or changed since
    `before`, by path: their content within `limits`, else the reason each was left out.
    A symlink is left out ("symlink") and never read; a workspace that is itself a
    symlink (or gone) yields no file, only a note at path "."."""
    try:
        top = open_folder(base, cwd)
    except SymlinkInPath:
        log.warning("artifacts_workspace_symlink", extra={"path": str(cwd)})
        return [
            Artifact(
                WORKSPACE,
                0,
                omitted_reason=f"{SYMLINK}: the workspace itself was replaced "
                "by a symlink, so nothing in it was kept",
            )
        ]
    except OSError as exc:
        return [
            Artifact(
                WORKSPACE, 0, omitted_reason=f"the workspace could not be read: {exc.strerror}"
            )
        ]
    try:
        listing = walk(top, max_depth=MAX_DEPTH, max_entries=MAX_ENTRIES)
        return _artifacts(top, listing, before, limits)
    finally:
        os.close(top)


def _artifacts(
    top: int, listing: Listing, before: dict[str, Stamp], limits: FileLimits
) -> list[Artifact]:
    kept: list[Artifact] = []
    left_out: list[Artifact] = [
        Artifact(path, 0, omitted_reason=f"more than {MAX_DEPTH} folders deep")
        for path in listing.too_deep
    ]
    total = 0
    for path, st in listing.entries:
        if stat.S_ISLNK(st.st_mode):
            left_out.append(Artifact(path, 0, omitted_reason=SYMLINK))
            continue
        if not stat.S_ISREG(st.st_mode):
            left_out.append(Artifact(path, 0, omitted_reason="not a regular file"))
            continue
        if before.get(path) == (st.st_size, st.st_mtime_ns, st.st_ino):
            continue
        reason = ""
        if len(kept) >= limits.max_artifacts:
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
            left_out.append(Artifact(path, st.st_size, omitted_reason=reason))
            continue
        room = min(limits.max_artifact_bytes, limits.max_artifacts_total_bytes - total)
        content = read_file(top, path, st, room)
        if content is None:
            left_out.append(
                Artifact(
                    path, st.st_size, omitted_reason="could not be read (or changed meanwhile)"
                )
            )
            continue
        total += len(content)
        kept.append(Artifact(path, len(content), hashlib.sha256(content).hexdigest(), content))
    notes = []
    more = len(left_out) - MAX_LEFT_OUT
    if more > 0:
        notes.append(f"{more} more files left out are not listed (at most {MAX_LEFT_OUT} are)")
    if listing.truncated:
        notes.append(
            f"the workspace holds more than {MAX_ENTRIES} entries: the rest was not looked at"
        )
    found = kept + left_out[:MAX_LEFT_OUT]
    if notes:
        found.append(Artifact(WORKSPACE, 0, omitted_reason="; ".join(notes)))
    return sorted(found, key=lambda a: a.path)
