"""Live tenants: the tenants file is re-read on SIGHUP and when its contents change.

A new file is checked whole first (`TenantRegistry.parse`, then the server's own checks);
an invalid one changes nothing: the last valid file stays in force, one log line names the
problem, and health `agentplane.tenants` is NOT_SERVING until a valid file is read. A valid
one replaces the registry's contents in one step, then the server follows it (`applied`:
sessions of removed tenants are cancelled, the warm pool restocked). Sessions running keep
the Tenant they were admitted with, so they finish under that policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..errors import ConfigError
from .registry import TenantChanges, TenantRegistry

log = logging.getLogger(__name__)

# How often the file is read to see whether it changed (AGENTPLANE_TENANTS_POLL_S). It is
# small: reading it whole also catches an edit that keeps its size and mtime.
POLL_INTERVAL_S = 1.0


class TenantsReloader:
    """Keeps a live TenantRegistry equal to the last valid version of its file."""

    def __init__(
        self,
        path: Path,
        registry: TenantRegistry,
        *,
        check: Callable[[TenantRegistry], None] = lambda registry: None,
        applied: Callable[[TenantRegistry, TenantChanges], None] = lambda r, c: None,
        status: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        """`check` raises ConfigError for what the server cannot run with (beyond the
        file's own rules); `applied` follows a replacement; `status` is told whether the
        file on disk is valid (health)."""
        self.path = path
        self.registry = registry
        self._check = check
        self._applied = applied
        self._status = status
        # The contents last read (valid or not), or why it could not be read.
        self._seen: bytes | str | None = None
        self._lock = asyncio.Lock()  # SIGHUP and the watcher, one reload at a time
        self.problem: str | None = None  # why the file on disk is not in force
        self.reloads = 0  # valid files that changed something, applied since start
        self.reads = 0  # times the file was read

    async def reload(self, trigger: str) -> TenantChanges | None:
        """Read the file now and apply it if it is valid; what changed (None: invalid)."""
        async with self._lock:
            data = await self._read()
            return await self._apply(data, trigger)

    async def watch(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Reload whenever the file's contents change, until cancelled."""
        while True:
            async with self._lock:
                data = await self._read()
                if _seen(data) != self._seen:
                    # The first read after start applies what start loaded: unchanged
                    # (said nowhere) unless the file changed in between.
                    await self._apply(data, "file changed" if self._seen is not None else "")
            await asyncio.sleep(interval_s)

    async def _read(self) -> bytes | ConfigError:
        self.reads += 1
        try:
            return await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            return ConfigError(
                "AGENTPLANE_TENANTS_FILE", f"cannot read {self.path}: {exc.strerror}"
            )

    async def _apply(self, data: bytes | ConfigError, trigger: str) -> TenantChanges | None:
        self._seen = _seen(data)
        try:
            if isinstance(data, ConfigError):
                raise data
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise ConfigError(
                    "AGENTPLANE_TENANTS_FILE", f"{self.path} is not UTF-8 text"
                ) from None
            new = TenantRegistry.parse(text, self.path)
            self._check(new)
        except ConfigError as exc:
            self.problem = str(exc)
            log.error(
                "tenants_reload_failed",
                extra={
                    "trigger": trigger or "start",
                    "detail": f"{exc}; the last valid tenants file stays in force",
                },
            )
            await self._set_status(False)
            return None
        changes = self.registry.replace(new)
        try:
            self._applied(self.registry, changes)
        except Exception:  # the new file is in force: say what failed to follow it
            log.exception("tenants_reload_follow_up_failed")
        was_invalid, self.problem = self.problem is not None, None
        if changes:
            self.reloads += 1
        if changes or trigger == "SIGHUP" or was_invalid:
            log.info(
                "tenants_reloaded",
                extra={
                    "trigger": trigger or "start",
                    "tenants": len(self.registry.tenants),
                    "added": list(changes.added),
                    "removed": list(changes.removed),
                    # Names of the settings that changed, never their values.
                    "changed": {name: list(keys) for name, keys in changes.changed.items()},
                },
            )
        await self._set_status(True)
        return changes

    async def _set_status(self, valid: bool) -> None:
        if self._status is not None:
            await self._status(valid)


def _seen(data: bytes | ConfigError) -> bytes | str:
    return data if isinstance(data, bytes) else str(data)
