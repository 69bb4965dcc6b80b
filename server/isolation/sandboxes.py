"""The server's sandboxes: checked at start, then one per session folder.

A session folder `<work dir>/<tenant>/<key>/` gets a tmpfs of its disk limit mounted on
it, a cgroup `<tenant>.<key>` with its memory and process limits, and a CLI started
through the launcher script (`bwrap.py`). `remove` undoes all three, killing whatever
still runs in the cgroup first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..domain import ErrorReason
from .bwrap import Tools, sandbox_args, session_variables, write_launcher
from .cgroups import Cgroups, CgroupsUnavailable, SessionCgroup
from .limits import Breach, SessionLimits
from .mounts import mount_tmpfs, unmount

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

    @classmethod
    def open(cls, work_dir: Path, cli: Path, gateway_socket: Path, gateway_port: int) -> Sandboxes:
        """Check that this host can sandbox sessions (SandboxUnavailable if not) and write
        the launcher script under `work_dir`."""
        tools = find_tools()
        probe(tools, work_dir)
        try:
            cgroups = Cgroups.discover()
        except CgroupsUnavailable as exc:
            raise SandboxUnavailable(f"no per-session limits: {exc}") from None
        # One per server process: replicas sharing a work dir may run different CLIs.
        launcher = work_dir / ".launchers" / f"sandbox-{os.getpid()}.sh"
        return cls(write_launcher(launcher, tools, cli), gateway_socket, gateway_port, cgroups)

    def close(self) -> None:
        """Remove the launcher script and the gateway's socket file."""
        self.launcher.unlink(missing_ok=True)
        self.gateway_socket.unlink(missing_ok=True)

    def prepare(self, root: Path, limits: SessionLimits, uid: int, gid: int) -> None:
        """Mount the folder's tmpfs (its disk limit) on `root` and make its cgroup."""
        root.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(root):
            limit = limits.disk_mib << 20
            # Room above the limit, so that a session past it stays past it (and is seen
            # so by `breach`) even when the agent deletes a few files after its ENOSPC.
            mount_tmpfs(root, size_bytes=limit + max(1 << 20, limit // 8), uid=uid, gid=gid)
        self._cgroup(root).create(limits)

    def reseal(self, root: Path, uid: int, gid: int) -> None:
        """Before another CLI starts in `root` (a retry): kill whatever of the session
        still runs, and make the folders the launcher binds or writes into real folders
        again: `h` (HOME), and `t` (/tmp) afresh and empty. An agent may have replaced
        them, or filled /tmp, with symlinks to anywhere on the host, which bwrap and the
        launcher, running as root outside the sandbox, would follow."""
        self._cgroup(root).kill_all()
        for name in ("t", "h"):
            path = root / name
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)  # a symlink, a file, or nothing
            elif name == "t":
                shutil.rmtree(path)
            else:
                continue
            path.mkdir(mode=0o700)
            os.chown(path, uid, gid)

    def variables(
        self,
        root: Path,
        passed: Iterable[str],
        uid: int | None,
        gid: int | None,
        ro_paths: Iterable[str] = (),
    ) -> dict[str, str]:
        """The launcher's variables for one CLI start in the folder `root`."""
        return session_variables(
            passed=passed,
            cgroup_procs=self._cgroup(root).procs_files(),
            gateway_socket=self.gateway_socket,
            port=self.gateway_port,
            uid=uid,
            gid=gid,
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

    def _cgroup(self, root: Path) -> SessionCgroup:
        return self.cgroups.session(f"{root.parent.name}.{root.name}")


def find_tools() -> Tools:
    """bwrap, socat and setpriv from PATH; SandboxUnavailable naming what is missing."""
    found = {name: shutil.which(name) for name in ("bwrap", "socat", "setpriv")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SandboxUnavailable(f"{' and '.join(missing)} not found on PATH ({INSTALL_HINT})")
    return Tools(*(Path(str(found[n])) for n in ("bwrap", "socat", "setpriv")))


def probe(tools: Tools, work_dir: Path) -> None:
    """Start one empty sandbox (namespaces, binds, a tmpfs) the way sessions will."""
    scratch = work_dir / f".probe-{os.getpid()}"
    scratch.mkdir(mode=0o700, exist_ok=True)
    try:
        try:
            mount_tmpfs(scratch, size_bytes=1 << 20, uid=os.getuid(), gid=os.getgid())
        except OSError as exc:
            raise SandboxUnavailable(
                f"cannot mount a size-limited folder for sessions ({exc.strerror}); "
                "the server must run as root (or with CAP_SYS_ADMIN)"
            ) from None
        unmount(scratch)
        try:
            done = subprocess.run(
                [
                    str(tools.bwrap),
                    *sandbox_args(),
                    "--bind",
                    str(scratch),
                    "/tmp",
                    "--",
                    "/bin/sh",
                    "-c",
                    "echo ok > /tmp/probe",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"{tools.bwrap} does not start: {exc}") from None
        if done.returncode != 0 or not (scratch / "probe").is_file():
            said = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SandboxUnavailable(
                f"{tools.bwrap} cannot create a sandbox here ({said}); it needs root or "
                "unprivileged user namespaces"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _used_bytes(root: Path) -> int:
    try:
        stat = os.statvfs(root)
    except OSError:
        return 0
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize
