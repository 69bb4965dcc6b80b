"""Files beneath a folder an agent controls, reached without following a symlink.

The server runs as root and a session's agent owns its folder: any component of a path in
it may be swapped for a symlink (to a host folder, say) at any time, also while the server
reads it. So nothing here resolves a path: every step opens one name relative to the
folder descriptor before it, with O_NOFOLLOW (a symlink is refused with ELOOP, never
followed), and a file read is checked by fstat to be the regular file that was listed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO swapped in for a file must not hang the server.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_folder(base: Path, path: Path) -> int:
    """A descriptor of the folder `path` below `base`, opened one component at a time
    with O_NOFOLLOW from `base` (trusted: the server's own work dir). SymlinkInPath if a
    component is a symlink; another OSError if one is not a folder or is missing."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_folder_at(fd, path.relative_to(base).parts)
    finally:
        os.close(fd)


def open_folder_at(dir_fd: int, parts: Iterable[str]) -> int:
    """A new descriptor of the folder `parts` below `dir_fd`, each opened with
    O_NOFOLLOW (SymlinkInPath for a symlink)."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:  # only ever down, one name at a time
                raise OSError(errno.EINVAL, "not a plain name", part)
            try:
                inner = os.open(part, FOLDER_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(fd, part):
                    raise SymlinkInPath(part) from None
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


class SymlinkInPath(OSError):
    """A component of a path is a symlink (so it was not followed)."""

    def __init__(self, name: str) -> None:
        super().__init__(errno.ELOOP, "a symlink, never followed", name)


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@dataclass
class Listing:
    """What `walk` found: entries (relative path, lstat), by path."""

    entries: list[tuple[str, os.stat_result]] = field(default_factory=list)
    # Folders not entered: deeper than max_depth.
    too_deep: list[str] = field(default_factory=list)
    # The walk stopped at max_entries: more was there.
    truncated: bool = False


def walk(top: int, *, max_depth: int, max_entries: int) -> Listing:
    """Every entry below the folder `top` (a descriptor) but folders themselves: regular
    files, symlinks (listed, never followed) and anything else, each with its lstat.

    Folders are entered by descriptor (O_NOFOLLOW), one descriptor per level open at a
    time; at most `max_depth` levels and `max_entries` entries are visited."""
    found = Listing()
    entered = 0
    # Each level: its descriptor, its path prefix, its sub-folders still to enter.
    stack: list[tuple[int, str, list[str]]] = []
    try:
        stack.append(_level(os.dup(top), "", found, max_entries))
        while stack:
            fd, prefix, folders = stack[-1]
            if not folders:
                os.close(fd)
                stack.pop()
                continue
            if entered + len(found.entries) >= max_entries:
                found.truncated = True
                break
            name = folders.pop()
            path = prefix + name
            entered += 1
            if len(stack) >= max_depth:
                found.too_deep.append(path)
                continue
            try:
                inner = os.open(name, FOLDER_FLAGS, dir_fd=fd)
            except OSError:  # swapped meanwhile (for a symlink, say), or gone: not entered
                continue
            stack.append(_level(inner, path + "/", found, max_entries - entered))
        if entered + len(found.entries) > max_entries:
            found.truncated = True
            del found.entries[max(0, max_entries - entered) :]
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    found.entries.sort(key=lambda item: item[0])
    return found


def _level(fd: int, prefix: str, found: Listing, room: int) -> tuple[int, str, list[str]]:
    """List one folder: its non-folder entries go to `found`; its folders are returned
    (together at most `room`: past that, the listing is truncated)."""
    folders: list[str] = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if len(folders) + len(found.entries) >= room:
                    found.truncated = True
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    folders.append(entry.name)
                else:
                    found.entries.append((prefix + entry.name, st))
    except OSError:
        pass  # unreadable: nothing listed in it
    folders.sort(reverse=True)  # popped from the end: entered by name
    return fd, prefix, folders


def read_file(top: int, path: str, listed: os.stat_result, limit: int) -> bytes | None:
    """The content of the regular file `path` below `top`, if it is still the file that
    was `listed` (same inode, not larger than `limit`); None if it is not, or unreadable."""
    *folders, name = path.split("/")
    try:
        fd = open_folder_at(top, folders)
    except OSError:
        return None
    try:
        file = os.open(name, FILE_FLAGS, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    with os.fdopen(file, "rb") as opened:
        st = os.fstat(opened.fileno())
        if (
            not stat.S_ISREG(st.st_mode)
            or (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino)
            or st.st_size > limit
        ):
            return None
        try:
            content = opened.read(limit + 1)
        except OSError:
            return None
    return content if len(content) <= limit else None
