"""Each session's private folder under the work dir: where it lies, setting it up, removing it."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Protocol

from .cli_env import SessionDirs
from .limits import SessionLimits
from .owners import owner_alive, write_marker
from .reaper import kill_session_processes
from .sandboxes import Sandboxes


class Tenant(Protocol):
    """What the sandbox reads of a tenant (`tenants.Tenant` is one): its folder's name, the
    limits of its sessions, its workspace template and the host user its agents run as."""

    @property
    def name(self) -> str: ...

    @property
    def limits(self) -> SessionLimits: ...

    @property
    def workspace_template(self) -> Path | None: ...

    def unix_ids(self) -> tuple[int, int] | None: ...


# `<tenant>/<folder>.owner`, beside the folder: out of its sandboxed agent's reach.
OWNER_SUFFIX = ".owner"


class SessionFolders:
    """`<work dir>/<tenant>/<session>/`: made before an agent starts, removed (with every
    process still running in it) when it ends, or by `sweep` when its server died."""

    def __init__(self, work_dir: Path, sandboxes: Sandboxes | None = None) -> None:
        self.work_dir = work_dir
        self._sandboxes = sandboxes

    def dirs(self, tenant: str, session_id: str) -> SessionDirs:
        """The folders of a session (short: the CLI's socket path limit)."""
        return SessionDirs(self.work_dir / tenant / session_id.replace("-", "")[:16])

    async def prepare(self, dirs: SessionDirs, tenant: Tenant) -> None:
        """Make the session's folders and copy the tenant's workspace template into its cwd."""
        await asyncio.to_thread(self._prepare, dirs, tenant)

    def _prepare(self, dirs: SessionDirs, tenant: Tenant) -> None:
        # The tenant's folder is 0700 (and its os_user's), so no other tenant's agent,
        # running as another user, can even list it.
        tenant_root = self.work_dir / tenant.name
        tenant_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tenant_root.chmod(0o700)
        ids = tenant.unix_ids()
        if ids is not None:
            os.chown(tenant_root, *ids)
        # Before the folder: a folder never exists without its owner's mark.
        write_marker(_marker(dirs.root))
        if self._sandboxes is not None:
            # The session's own uid (or its tenant's os_user): never the server's.
            ids = self._sandboxes.prepare(dirs.root, tenant.limits, ids)
        dirs.create(owner=ids)
        if tenant.workspace_template is not None:
            shutil.copytree(tenant.workspace_template, dirs.cwd, dirs_exist_ok=True)
            if ids is not None:
                for path in [dirs.cwd, *dirs.cwd.rglob("*")]:
                    os.chown(path, *ids, follow_symlinks=False)

    def owner(self, root: Path, tenant: Tenant) -> tuple[int, int] | None:
        """The uid and gid the agents of the folder `root` run as (None: the server's,
        unsandboxed without an os_user)."""
        if self._sandboxes is not None:
            return self._sandboxes.owner(root)
        return tenant.unix_ids()

    async def remove(self, root: Path) -> None:
        """Kill every process of the session folder `root` (tools included), remove it
        (and its sandbox)."""
        await asyncio.to_thread(self._remove, root)

    def _remove(self, root: Path) -> None:
        # Sandboxed, the cgroup holds every process; the marker also finds those of a
        # server that died before its sandbox started (or of an unsandboxed one).
        kill_session_processes(root)
        if self._sandboxes is not None:
            self._sandboxes.remove(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
        _marker(root).unlink(missing_ok=True)

    async def sweep(self, work_dir: Path | None = None) -> int:
        """Remove the folders (and kill the processes) of sessions and warm agents whose
        server died, in `work_dir` (default: this server's); returns how many. Folders
        of live servers sharing it, and folders with no mark (a release before marks),
        are left alone."""
        orphans = await asyncio.to_thread(_orphans, work_dir or self.work_dir)
        for root in orphans:
            await self.remove(root)
        return len(orphans)


def _orphans(work_dir: Path) -> list[Path]:
    try:
        markers = list(work_dir.glob(f"*/*{OWNER_SUFFIX}"))
    except OSError:  # the work dir is gone (a server removed it meanwhile)
        return []
    return [m.with_name(m.name.removesuffix(OWNER_SUFFIX)) for m in markers if not owner_alive(m)]


def _marker(root: Path) -> Path:
    return root.with_name(root.name + OWNER_SUFFIX)
