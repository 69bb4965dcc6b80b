"""App.start: a start that fails part-way closes whatever it had opened."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from agentplane.server.app import App
from agentplane.server.config import Settings
from agentplane.server.errors import ConfigError
from agentplane.server.tenants import TenantRegistry
from harness import short_dir
from test_server_process import free_port

pytestmark = pytest.mark.asyncio


def listening_sockets() -> set[int]:
    """Inodes of this process's TCP sockets in the LISTEN state."""
    ours = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(int(target[8:-1]))
    listening = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in ours:  # 0A: LISTEN
                listening.add(int(fields[9]))
    return listening


async def test_a_start_that_cannot_bind_leaves_nothing_open(tmp_path: Path) -> None:
    with socket.socket() as blocker:  # no SO_REUSEPORT: nobody else may bind the port
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        work = short_dir()
        settings = Settings(
            listen=f"127.0.0.1:{port}",
            database_url=f"sqlite:///{tmp_path}/agentplane.db",
            work_dir=work / "w",
            prometheus_port=free_port(),  # the Prometheus endpoint (a thread) opens first
        )
        sockets, tasks = listening_sockets(), asyncio.all_tasks()

        with pytest.raises(ConfigError, match=f"cannot bind 127.0.0.1:{port}: the port is in use"):
            await App.start(settings, TenantRegistry.dev())

        await asyncio.sleep(0)  # let cancelled tasks finish
        assert listening_sockets() == sockets  # not the gateway's, not Prometheus's
        assert asyncio.all_tasks() == tasks
        # Prometheus serves from a thread of its own (prometheus_client's serve_forever).
        assert not [t for t in threading.enumerate() if "serve_forever" in t.name]


async def test_a_fallback_model_without_a_price_stops_the_start(tmp_path: Path) -> None:
    from harness import tenant_toml, write_tenants

    tenants = write_tenants(
        tmp_path, tenant_toml("a", "tok", fallback_models=["claude-haiku-4-5", "claude-unpriced-9"])
    )
    work = short_dir()
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path}/agentplane.db",
        work_dir=work / "w",
        sandbox=False,
    )
    try:
        with pytest.raises(ConfigError, match="tenants.a.fallback_models: model claude-unpriced"):
            await App.start(settings, TenantRegistry.load(tenants))
    finally:
        shutil.rmtree(work, ignore_errors=True)
