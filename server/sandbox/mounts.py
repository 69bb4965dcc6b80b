"""A size-limited tmpfs for a session's folder (the disk limit), through libc."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MNT_DETACH = 2
_MS_NOSUID = 2
_MS_NODEV = 4


def mount_tmpfs(path: Path, *, size_bytes: int, uid: int, gid: int) -> None:
    """Mount a tmpfs of `size_bytes` on `path` (an existing folder), mode 0700, owned by
    uid:gid; no device files, no set-uid programs."""
    options = f"size={size_bytes},mode=0700,uid={uid},gid={gid}".encode()
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options):
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount a tmpfs on {path}: {os.strerror(err)}")


def unmount(path: Path) -> None:
    """Detach the mount on `path`, if there is one."""
    if os.path.ismount(path) and _libc.umount2(os.fsencode(path), _MNT_DETACH):
        err = ctypes.get_errno()
        raise OSError(err, f"cannot unmount {path}: {os.strerror(err)}")
