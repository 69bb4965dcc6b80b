"""The seccomp filter every sandboxed process runs under, compiled with libseccomp.

A blocklist after Flatpak's (`common/flatpak-run.c`, `setup_seccomp`) and Docker's default
profile: the kernel surface a coding agent has no use for and that sandbox escapes go
through. bwrap loads the compiled filter (`--seccomp FD`) just before it starts the
session's first process, with no_new_privs set; every process of the session inherits it.
Syscalls of other ABIs (32-bit x86, x32) are killed: the filter knows only the native one.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyseccomp as seccomp

# <linux/sched.h>
_CLONE_NEW = {
    "CLONE_NEWTIME": 0x00000080,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
# <asm-generic/ioctls.h>
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C

# Refused with EPERM.
BLOCKED = (
    # The kernel keyring: shared by every process of a uid, outside any namespace.
    "add_key",
    "keyctl",
    "request_key",
    # New namespaces and the mount table: more kernel surface, and a way around the sandbox.
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    # Other processes' memory and state.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    # Profiling, BPF and page-fault handling: a long record of kernel exploits.
    "perf_event_open",
    "bpf",
    "userfaultfd",
    # Kernel modules, kexec, reboot, swap, accounting, quotas, the kernel log.
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    # Files by handle (a way out of a bind mount), clocks, I/O ports, old and NUMA calls.
    "open_by_handle_at",
    "name_to_handle_at",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "uselib",
    "vhangup",
    "lookup_dcookie",
    "nfsservctl",
    "move_pages",
    "mbind",
    "get_mempolicy",
    "set_mempolicy",
    "migrate_pages",
)
# Refused with ENOSYS, so that programs fall back to an older call the filter can check
# (clone3's flags are behind a pointer seccomp cannot follow; glibc then uses clone) or
# go without (the new mount API, io_uring, whose operations bypass this filter).
UNSUPPORTED = (
    "clone3",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)


def build() -> seccomp.SyscallFilter:
    """The filter: everything allowed but the calls above (and non-native ABIs)."""
    flt = seccomp.SyscallFilter(seccomp.ALLOW)
    eperm, enosys = seccomp.ERRNO(errno.EPERM), seccomp.ERRNO(errno.ENOSYS)
    for name in BLOCKED:
        flt.add_rule(eperm, name)
    for name in UNSUPPORTED:
        flt.add_rule(enosys, name)
    # clone() making any new namespace (threads and forks stay allowed).
    for flag in _CLONE_NEW.values():
        flt.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # Typing into the terminal of whoever holds it (CVE-2017-5226, CVE-2023-28100).
    for request in (_TIOCSTI, _TIOCLINUX):
        flt.add_rule(eperm, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    return flt


def write(path: Path) -> Path:
    """Compile the filter to BPF in `path` (readable by the server only); returns it."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        build().export_bpf(out)
    tmp.replace(path)
    return path
