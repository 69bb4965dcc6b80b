"""The client's target and service config: several replicas get health-checked round_robin,
every client retries UNAVAILABLE, bad address lists are clear errors; the docs carry the
same config (the Node client's: tests/test_polyglot.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from agentplane import AsyncClient, Client, HealthStatus, service_config
from agentplane._channel import (
    ADMISSION_HEALTH_SERVICE,
    HEALTH_SERVICE,
    channel_options,
    resolve,
)
from agentplane.cli import main
from agentplane.server.health import ADMISSION, READY_NAMES
from agentplane.v1 import budget_pb2, session_pb2, usage_pb2
from harness import TOKENS, Harness
from test_server_process import free_port

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:5001", "127.0.0.1:5001"),
        ("agentplane.internal:50051", "agentplane.internal:50051"),
        ("unix:/run/agentplane.sock", "unix:/run/agentplane.sock"),
        ("ipv4:127.0.0.1:5001", "ipv4:127.0.0.1:5001"),
        (["10.0.0.1:50051"], "10.0.0.1:50051"),
        (" 127.0.0.1:5001 ", "127.0.0.1:5001"),
    ],
)
def test_one_address_is_kept_as_it_is(target: str | list[str], expected: str) -> None:
    assert resolve(target) == (expected, False)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["127.0.0.1:5001", "127.0.0.1:5002"], "ipv4:127.0.0.1:5001,127.0.0.1:5002"),
        (("10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"), "ipv4:10.0.0.1:1,10.0.0.2:2,10.0.0.3:3"),
        ("127.0.0.1:5001, 127.0.0.1:5002", "ipv4:127.0.0.1:5001,127.0.0.1:5002"),
        (["[::1]:5001", "[fd00::2]:5002"], "ipv6:[::1]:5001,[fd00::2]:5002"),
        ("ipv4:127.0.0.1:5001,127.0.0.1:5002", "ipv4:127.0.0.1:5001,127.0.0.1:5002"),
        ("dns:///agentplane.svc:50051", "dns:///agentplane.svc:50051"),
    ],
)
def test_several_replicas_make_one_balanced_target(target: str | list[str], expected: str) -> None:
    assert resolve(target) == (expected, True)


def test_the_target_list_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPLANE_TARGET", "127.0.0.1:5001,127.0.0.1:5002")
    assert resolve(None) == ("ipv4:127.0.0.1:5001,127.0.0.1:5002", True)
    monkeypatch.delenv("AGENTPLANE_TARGET")
    assert resolve(None) == ("127.0.0.1:50051", False)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ([], "no target address"),
        ("127.0.0.1:5001,", "empty address"),
        (["127.0.0.1:5001", ""], "empty address"),
        (["127.0.0.1", "127.0.0.1:5002"], "expected host:port"),
        (["127.0.0.1:0", "127.0.0.1:5002"], "port must be a number from 1 to 65535"),
        (["127.0.0.1:http", "127.0.0.1:5002"], "port must be a number"),
        (["127.0.0.1:70000", "127.0.0.1:5002"], "port must be a number"),
        (["a.example:1", "b.example:2"], "dns:///a.example:PORT"),
        (["127.0.0.1:5001", "[::1]:5002"], "mixes IPv4 and IPv6"),
        (["127.0.0.1:5001", "127.0.0.1:5001"], "given twice"),
        (["dns:///x:1", "127.0.0.1:2"], "not grpc targets"),
        (["::1:5001", "::1:5002"], "in brackets"),
        (["[::1]5001", "[::1]:5002"], "expected host:port"),
        ([1, 2], "must be strings"),
    ],
)
def test_a_bad_address_list_is_a_value_error_naming_the_problem(target: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve(target)
    with pytest.raises(ValueError, match="target|address|port|IPv|twice|strings"):
        Client(target)


def test_the_service_config_balances_checks_health_and_retries_unavailable() -> None:
    balanced, single = service_config(), service_config(balanced=False)
    assert balanced["loadBalancingConfig"] == [{"round_robin": {}}]
    # The name the server keeps NOT_SERVING while it cannot take sessions (and draining).
    assert balanced["healthCheckConfig"] == {"serviceName": HEALTH_SERVICE}
    assert HEALTH_SERVICE in READY_NAMES
    assert "loadBalancingConfig" not in single and "healthCheckConfig" not in single
    assert single["methodConfig"] == balanced["methodConfig"]
    (method,) = balanced["methodConfig"]
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= policy["maxAttempts"] <= 5  # grpc caps attempts at 5
    # Every agentplane service is covered, so a new one cannot be left without retries.
    services = {
        s.full_name
        for module in (session_pb2, budget_pb2, usage_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
    }
    assert services <= {n["service"] for n in method["name"] if "method" not in n}
    assert service_config() is not service_config()  # callers may change their copy


def test_run_session_is_balanced_over_the_replicas_with_room() -> None:
    # RunSession's channel checks the name a full replica turns NOT_SERVING; the same
    # retries (REPLICA_FULL is UNAVAILABLE: retried on the next replica).
    admission = service_config(admission=True)
    assert admission["healthCheckConfig"] == {"serviceName": ADMISSION_HEALTH_SERVICE}
    assert ADMISSION_HEALTH_SERVICE == ADMISSION
    assert admission["methodConfig"] == service_config()["methodConfig"]
    client = Client(["127.0.0.1:1", "127.0.0.1:2"])
    try:
        assert client._admission_channel is not client._channel
    finally:
        client.close()
    single = Client("127.0.0.1:1")
    try:
        assert single._admission_channel is single._channel  # one replica: one channel
    finally:
        single.close()


def test_the_callers_own_channel_options_win() -> None:
    mine = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
    options = dict(channel_options(True, [("grpc.service_config", mine)]))
    assert options["grpc.service_config"] == mine and options["grpc.enable_retries"] == 1
    options = dict(channel_options(False, [("grpc.enable_retries", 0)]))
    assert options["grpc.enable_retries"] == 0
    assert json.loads(options["grpc.service_config"]) == service_config(balanced=False)


async def test_both_clients_take_several_addresses() -> None:
    addresses = ["127.0.0.1:5001", "127.0.0.1:5002"]
    with Client(addresses) as client:
        assert (client.target, client.balanced) == ("ipv4:127.0.0.1:5001,127.0.0.1:5002", True)
    async with AsyncClient("127.0.0.1:5001,127.0.0.1:5002") as aclient:
        assert (aclient.target, aclient.balanced) == (client.target, True)
    async with AsyncClient("127.0.0.1:5001") as one:
        assert (one.target, one.balanced) == ("127.0.0.1:5001", False)


async def test_a_balanced_client_skips_a_replica_that_is_down(harness: Harness) -> None:
    # grpc accepts the config (a bad one fails every call) and balances past a dead address.
    addresses = [f"127.0.0.1:{harness.app.port}", f"127.0.0.1:{free_port()}"]
    async with AsyncClient(addresses, token=TOKENS["acme"], timeout=10) as client:
        assert client.balanced
        assert await client.health() is HealthStatus.SERVING
        for _ in range(4):  # round robin: each call picks again
            assert (await client.get_budget()).tenant == "acme"


def test_the_cli_says_what_is_wrong_with_a_target_list(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--target", "127.0.0.1:1,127.0.0.1:http", "health"]) == 2
    assert "the port must be a number" in capsys.readouterr().err
    monkeypatch.setenv("AGENTPLANE_TARGET", "a.example:1,b.example:2")
    assert main(["budget"]) == 2
    assert "dns:///a.example:PORT" in capsys.readouterr().err


def json_block_after(text: str, marker: str, opening: str) -> Any:
    """The JSON that follows the line `opening` after `marker` in `text`, up to the end of
    the block (a ``` fence, or text indented less than the JSON)."""
    lines = text[text.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == opening) + 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start:]:
        if line.strip() == "```" or (line.strip() and len(line) - len(line.lstrip()) < indent):
            break
        block.append(line)
    return json.loads(textwrap.dedent("\n".join(block)))


def test_the_operations_page_and_kubernetes_example_show_the_clients_service_config() -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    assert json_block_after(page, "## Clients of several replicas", "```json") == (service_config())
    manifest = (ROOT / "deploy" / "kubernetes.yaml").read_text()
    assert json_block_after(manifest, "name: agentplane-client", "service-config.json: |") == (
        service_config()
    )
