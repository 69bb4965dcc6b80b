"""The rooms stay apart: each subsystem's public modules import, in a fresh interpreter,
none of the rooms they should not need (the sandbox nothing of the sessions, the model
double nothing of the server, the store nothing above it, ...)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SERVER = "agentplane.server"

# room: (its public modules, the rooms of agentplane.server it must not import)
ROOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # The double stands alone: nothing of the server (it runs without it, `model-double`).
    "model_double": (("model_double", "model_double.cli"), ("*",)),
    "sandbox": (
        (
            "sandbox.sandboxes",
            "sandbox.folders",
            "sandbox.bwrap",
            "sandbox.cgroups",
            "sandbox.cli_env",
            "sandbox.reaper",
            "sandbox.owners",
            "sandbox.host_dirs",
            "sandbox.uids",
        ),
        ("sessions", "tenants", "store", "gateway", "money", "api", "telemetry", "model_double"),
    ),
    "gateway": (
        ("gateway.proxy",),
        ("sessions", "store", "api", "sandbox", "telemetry", "model_double", "tenants"),
    ),
    "money": (
        ("money.pricing", "money.windows", "money.ledger", "money.shortfall"),
        ("sessions", "gateway", "api", "telemetry", "model_double"),
    ),
    "mcp": (("mcp.servers", "mcp.cli_config"), ("sessions", "gateway", "store", "api")),
    "store": (
        (
            "store.engine",
            "store.sessions",
            "store.notify",
            "store.ledger",
            "store.inputs",
            "store.artifacts",
            "store.outbox",
            "store.transcripts",
        ),
        ("sessions", "gateway", "money", "api", "sandbox", "telemetry", "tenants", "webhooks"),
    ),
    "caller loop": (
        ("sessions.caller_loop.loop", "sessions.caller_loop.inputs"),
        ("sessions.run", "sessions.agents", "sessions.admission", "gateway", "api"),
    ),
    "workspace": (
        ("sessions.workspace.files",),
        ("sessions.run", "sessions.agents", "sessions.caller_loop", "store", "gateway", "api"),
    ),
    # Telemetry watches sessions through the observer hook: sessions never import it.
    "sessions": (("sessions.build", "sessions.manager"), ("api", "telemetry", "model_double")),
}

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("agentplane.server."))))
"""


def _imported(modules: tuple[str, ...]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *(f"{SERVER}.{m}" for m in modules)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [m[len(SERVER) + 1 :] for m in json.loads(done.stdout)]


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_a_room_imports_none_of_the_rooms_it_should_not_need(room: str) -> None:
    modules, forbidden = ROOMS[room]
    imported = _imported(modules)
    own = {m.split(".")[0] for m in modules}
    if forbidden == ("*",):
        wrong = [m for m in imported if m.split(".")[0] not in own]
    else:
        wrong = [m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not wrong, f"{room} imports {wrong}"
