"""The server's sandboxes: checked at start, then one per session folder.

A session folder `<work dir>/<tenant>/<key>/` gets a host uid of its own (`uids.py`;
a tenant's os_user instead, when it has one), a tmpfs of its disk limit mounted on it and
owned by that uid, a cgroup `<tenant>.<key>` with its memory and process limits, and a CLI
started through the launcher script (`bwrap.py`) as that uid. `remove` undoes all of it,
killing whatever still runs in the cgroup first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..domain import ErrorReason
from . import seccomp
from .bwrap import Tools, sandbox_args, session_variables, write_launcher
from .cgroups import Cgroups, CgroupsUnavailable, SessionCgroup
from .limits import Breach, SessionLimits
from .mounts import mount_tmpfs, unmount
from .uids import Lease, NoFreeUid, UidPool, taken_by_users

INSTALL_HINT = "as root: apt-get install -y bubblewrap socat"


class SandboxUnavailable(Exception):
    """Sessions cannot be sandboxed here; the message says what is missing and what to do."""


@dataclass(frozen=True)
class Sandboxes:
    """Builds, watches and removes the sandbox of each session folder."""

    launcher: Path
    gateway_socket: Path
    gateway_port: int
    cgroups: Cgroups
    uids: UidPool
    _owners: dict[Path, tuple[int, int]] = field(default_factory=dict)
    _leases: dict[Path, Lease] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(
        cls,
        work_dir: Path,
        cli: Path,
        gateway_socket: Path,
        gateway_port: int,
        *,
        uid_range: tuple[int, int],
        uid_lock_dir: Path,
    ) -> Sandboxes:
        """Check that this host can sandbox sessions (SandboxUnavailable if not) and write
        the launcher script and the seccomp filter under `work_dir`."""
        tools = find_tools()
        users = taken_by_users(*uid_range)
        if users:
            raise SandboxUnavailable(
                f"the sessions' uid range {uid_range[0]}-{uid_range[1]} holds the host's "
                f"user {users[0]!r}; choose a range no user has (AGENTPLANE_SANDBOX_UIDS)"
            )
        try:
            uids = UidPool(uid_lock_dir, *uid_range)
        except OSError as exc:
            raise SandboxUnavailable(
                f"cannot keep the sessions' uids in {uid_lock_dir}: {exc}"
            ) from None
        # One per server process: replicas sharing a work dir may run different CLIs.
        folder = work_dir / ".launchers"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            filter_path = seccomp.write(folder / f"seccomp-{os.getpid()}.bpf")
        except OSError as exc:
            raise SandboxUnavailable(
                f"cannot build the seccomp filter ({exc}); it needs libseccomp "
                "(apt-get install -y libseccomp2)"
            ) from None
        probe(tools, work_dir, uids, filter_path)
        try:
            cgroups = Cgroups.discover()
        except CgroupsUnavailable as exc:
            raise SandboxUnavailable(f"no per-session limits: {exc}") from None
        launcher = write_launcher(folder / f"sandbox-{os.getpid()}.sh", tools, cli, filter_path)
        return cls(launcher, gateway_socket, gateway_port, cgroups, uids)

    def close(self) -> None:
        """Remove the launcher script, its seccomp filter and the gateway's socket file."""
        self.launcher.unlink(missing_ok=True)
        self.launcher.with_name(f"seccomp-{os.getpid()}.bpf").unlink(missing_ok=True)
        self.gateway_socket.unlink(missing_ok=True)

    def own(self, root: Path, ids: tuple[int, int] | None) -> tuple[int, int]:
        """The host uid and gid every process of the folder `root` runs as: `ids` (a
        tenant's os_user), else a uid of the range that no other live session holds
        (NoFreeUid when there is none), kept until `remove`."""
        with self._lock:
            if root in self._owners:
                return self._owners[root]
            if ids is None:
                lease = self.uids.acquire()
                self._leases[root] = lease
                ids = (lease.uid, lease.uid)
            if 0 in ids:
                raise NoFreeUid("a sandboxed agent never runs as root")
            self._owners[root] = ids
            return ids

    def owner(self, root: Path) -> tuple[int, int] | None:
        """The uid and gid of the folder's processes (None: not one of this server's)."""
        with self._lock:
            return self._owners.get(root)

    def prepare(
        self, root: Path, limits: SessionLimits, ids: tuple[int, int] | None
    ) -> tuple[int, int]:
        """Give the folder `root` its owner (see `own`), mount its tmpfs (its disk limit),
        owned by that uid, and make its cgroup; returns the owner's uid and gid."""
        uid, gid = self.own(root, ids)
        root.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(root):
            limit = limits.disk_mib << 20
            # Room above the limit, so that a session past it stays past it (and is seen
            # so by `breach`) even when the agent deletes a few files after its ENOSPC.
            mount_tmpfs(root, size_bytes=limit + max(1 << 20, limit // 8), uid=uid, gid=gid)
        self._cgroup(root).create(limits)
        return uid, gid

    def reseal(self, root: Path) -> None:
        """Before another CLI starts in `root` (a retry): kill whatever of the session
        still runs, and make the folders the launcher binds or writes into real folders
        again: `h` (HOME) and `h/.claude` (the CLI's config), and `t` (/tmp) afresh and
        empty. An agent may have replaced them, or filled /tmp, with symlinks to anywhere
        on the host, which bwrap and the launcher, running as root outside the sandbox,
        would follow (or, inside, to folders the CLI cannot write)."""
        self._cgroup(root).kill_all()
        ids = self.owner(root)
        if ids is None:
            raise ValueError(f"{root} has no owner: prepare it first")
        for name in ("t", "h", "h/.claude"):
            path = root / name
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)  # a symlink, a file, or nothing
            elif name == "t":
                shutil.rmtree(path)
            else:
                continue
            path.mkdir(mode=0o700)
            os.chown(path, *ids)

    def variables(
        self,
        root: Path,
        passed: Iterable[str],
        user: str = "agent",
        ro_paths: Iterable[str] = (),
    ) -> dict[str, str]:
        """The launcher's variables for one CLI start in the folder `root` (prepared, so
        with its owner), whose user is called `user` inside."""
        ids = self.owner(root)
        if ids is None:
            raise ValueError(f"{root} has no owner: prepare it first")
        return session_variables(
            passed=passed,
            cgroup_procs=self._cgroup(root).procs_files(),
            gateway_socket=self.gateway_socket,
            port=self.gateway_port,
            uid=ids[0],
            gid=ids[1],
            user=user,
            ro_paths=ro_paths,
        )

    def breach(self, root: Path, limits: SessionLimits) -> Breach | None:
        """The limit the session in `root` hit, if any."""
        found = self._cgroup(root).breach(limits)
        if found is None and _used_bytes(root) > limits.disk_mib << 20:
            found = Breach(
                ErrorReason.DISK_LIMIT,
                (
                    f"the session wrote more than its disk limit of {limits.disk_mib} MiB "
                    "(its folder and /tmp)"
                ),
            )
        return found

    def remove(self, root: Path) -> None:
        """Kill every process of the folder's sandbox, unmount and remove the folder, and
        remove its cgroup. Safe to call for a folder that was never (fully) prepared."""
        cgroup = self._cgroup(root)
        cgroup.kill_all()
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)
        cgroup.remove()
        # Only now, with none of its processes left, may another session have the uid.
        with self._lock:
            self._owners.pop(root, None)
            lease = self._leases.pop(root, None)
        if lease is not None:
            lease.release()

    def _cgroup(self, root: Path) -> SessionCgroup:
        return self.cgroups.session(f"{root.parent.name}.{root.name}")


def find_tools() -> Tools:
    """bwrap, socat and setpriv from PATH; SandboxUnavailable naming what is missing."""
    found = {name: shutil.which(name) for name in ("bwrap", "socat", "setpriv")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SandboxUnavailable(f"{' and '.join(missing)} not found on PATH ({INSTALL_HINT})")
    return Tools(*(Path(str(found[n])) for n in ("bwrap", "socat", "setpriv")))


def probe(tools: Tools, work_dir: Path, uids: UidPool, seccomp_filter: Path) -> None:
    """Start one empty sandbox (namespaces, binds, a tmpfs, an unprivileged uid, the
    seccomp filter) the way sessions will."""
    scratch = work_dir / f".probe-{os.getpid()}"
    scratch.mkdir(mode=0o700, exist_ok=True)
    try:
        lease = uids.acquire()
    except NoFreeUid as exc:
        raise SandboxUnavailable(str(exc)) from None
    try:
        try:
            mount_tmpfs(scratch, size_bytes=1 << 20, uid=lease.uid, gid=lease.uid)
        except OSError as exc:
            raise SandboxUnavailable(
                f"cannot mount a size-limited folder for sessions ({exc.strerror}); "
                "the server must run as root (or with CAP_SYS_ADMIN)"
            ) from None
        with open(seccomp_filter, "rb") as rules:
            try:
                done = subprocess.run(
                    [
                        str(tools.bwrap),
                        *sandbox_args(),
                        "--cap-add",
                        "CAP_SETUID",
                        "--cap-add",
                        "CAP_SETGID",
                        "--seccomp",
                        str(rules.fileno()),
                        "--bind",
                        str(scratch),
                        "/tmp",
                        "--",
                        str(tools.setpriv),
                        f"--reuid={lease.uid}",
                        f"--regid={lease.uid}",
                        "--clear-groups",
                        "--no-new-privs",
                        "--",
                        "/bin/sh",
                        "-c",
                        "echo ok > /tmp/probe",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                    pass_fds=(rules.fileno(),),
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SandboxUnavailable(f"{tools.bwrap} does not start: {exc}") from None
        if done.returncode != 0 or not (scratch / "probe").is_file():
            said = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SandboxUnavailable(
                f"{tools.bwrap} cannot create a sandbox here ({said}); it needs root, "
                "namespaces and seccomp"
            )
    finally:
        unmount(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        lease.release()


def _used_bytes(root: Path) -> int:
    try:
        stat = os.statvfs(root)
    except OSError:
        return 0
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize
