"""Per-session cgroups: the memory, process and CPU limits, what was hit, and killing all.

Works with cgroup v1 (the memory, pids and cpuacct hierarchies) and cgroup v2 (one
unified hierarchy). Each session's cgroup lies under the server's own, in a folder named
`agentplane`, so its limits count against whatever limits the server itself runs under.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..domain import ErrorReason
from .limits import Breach, SessionLimits

CGROUP_FS = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "pids", "cpuacct")


class CgroupsUnavailable(OSError):
    """This host gives the server no cgroups it can create."""


@dataclass(frozen=True)
class Cgroups:
    """Where this server makes its sessions' cgroups: per controller (v1), or one (v2)."""

    parents: dict[str, Path]  # controller ("unified" on v2) -> the `agentplane` folder
    unified: bool

    @classmethod
    def discover(cls, root: Path = CGROUP_FS) -> Cgroups:
        """This server's cgroups, with their `agentplane` folders made; CgroupsUnavailable
        (saying why) when they cannot be."""
        own = _own_cgroups()
        try:
            if (root / "cgroup.controllers").is_file():
                return cls(_delegate_v2(root / own[""].lstrip("/")), unified=True)
            parents = {}
            for controller in _V1_CONTROLLERS:
                base = root / controller
                if not base.is_dir():
                    raise CgroupsUnavailable(
                        f"the {controller} cgroup controller is not mounted at {base}"
                    )
                parents[controller] = base / own.get(controller, "/").lstrip("/") / "agentplane"
                parents[controller].mkdir(exist_ok=True)
            return cls(parents, unified=False)
        except CgroupsUnavailable:
            raise
        except OSError as exc:
            raise CgroupsUnavailable(
                f"cannot create cgroups under {root} ({exc.strerror or exc}); the server needs "
                "write access to its own cgroup (run it as root, or delegate its cgroup)"
            ) from None

    def session(self, name: str) -> SessionCgroup:
        """The cgroup of the session folder `name` (made by `SessionCgroup.create`)."""
        return SessionCgroup({c: p / name for c, p in self.parents.items()}, self.unified)


@dataclass(frozen=True)
class SessionCgroup:
    """One session's cgroup (one folder per v1 controller)."""

    paths: dict[str, Path]
    unified: bool

    def create(self, limits: SessionLimits) -> None:
        """Make the cgroup and set its limits."""
        memory = str(limits.memory_mib << 20)
        if self.unified:
            path = self.paths["unified"]
            path.mkdir(exist_ok=True)
            _write(path / "memory.max", memory)
            _write(path / "memory.swap.max", "0", optional=True)
            _write(path / "pids.max", str(limits.processes))
            return
        for path in self.paths.values():
            path.mkdir(exist_ok=True)
        _write(self.paths["memory"] / "memory.limit_in_bytes", memory)
        # No swap either, where the kernel accounts it.
        _write(self.paths["memory"] / "memory.memsw.limit_in_bytes", memory, optional=True)
        _write(self.paths["pids"] / "pids.max", str(limits.processes))

    def procs_files(self) -> list[Path]:
        """The files a process writes its pid to, to join this cgroup."""
        return [path / "cgroup.procs" for path in self.paths.values()]

    def breach(self, limits: SessionLimits) -> Breach | None:
        """The memory, process or CPU limit the session hit, if any."""
        if self.unified:
            path = self.paths["unified"]
            oom = _field(path / "memory.events", "oom_kill")
            forks_refused = _field(path / "pids.events", "max")
            cpu_s = _field(path / "cpu.stat", "usage_usec") / 1e6
        else:
            oom = _field(self.paths["memory"] / "memory.oom_control", "oom_kill")
            forks_refused = _field(self.paths["pids"] / "pids.events", "max")
            cpu_s = _number(self.paths["cpuacct"] / "cpuacct.usage") / 1e9
        if oom:
            return Breach(
                ErrorReason.MEMORY_LIMIT,
                (
                    f"the session used more than its memory limit of {limits.memory_mib} MiB "
                    "(files in its folder count too); a process of it was killed"
                ),
            )
        if forks_refused:
            return Breach(
                ErrorReason.PROCESS_LIMIT,
                (
                    f"the session tried to run more than its limit of {limits.processes} "
                    "processes and threads at once"
                ),
            )
        if cpu_s > limits.cpu_s:
            return Breach(
                ErrorReason.CPU_LIMIT,
                (f"the session used more than its CPU-time limit of {limits.cpu_s} s"),
            )
        return None

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until none is left (or `timeout_s` passed)."""
        procs = self.procs_files()[0] if self.unified else self.paths["pids"] / "cgroup.procs"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                pids = [int(line) for line in procs.read_text().split()]
            except FileNotFoundError:
                return
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self) -> None:
        """Kill what is left in the cgroup and remove it (gone already is fine)."""
        self.kill_all()
        for path in self.paths.values():
            for _ in range(200):  # the kernel frees a cgroup shortly after its last task
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _own_cgroups() -> dict[str, str]:
    """controller -> this process's cgroup path ("" for the v2 hierarchy)."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            own[controller] = path
    return own


def _delegate_v2(own: Path) -> dict[str, Path]:
    """Make `own/agentplane` a parent whose children get the memory and pids controllers.

    cgroup v2 allows controllers below a cgroup only when it holds no process itself, so
    the server first moves into a leaf of its own, `own/server`.
    """
    leaf = own / "server"
    leaf.mkdir(exist_ok=True)
    for pid in own.joinpath("cgroup.procs").read_text().split():
        _write(leaf / "cgroup.procs", pid, optional=True)
    _write(own / "cgroup.subtree_control", "+memory +pids")
    parent = own / "agentplane"
    parent.mkdir(exist_ok=True)
    _write(parent / "cgroup.subtree_control", "+memory +pids")
    return {"unified": parent}


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise


def _number(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _field(path: Path, name: str) -> int:
    """The value of `name` in a flat-keyed cgroup file ("name value" lines)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
