"""The tenants file reloaded live: on a change on disk and on SIGHUP, validated whole
(an invalid file keeps the old one and says so in health), applied at once (a removed
token fails its next call, a lowered limit and a new tenant apply to the next admission,
a removed tenant's running sessions are cancelled, running ones keep their policy)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from agentplane.server.errors import ConfigError, Unauthenticated
from agentplane.server.health import TENANTS
from agentplane.server.model_double import SandboxServer
from agentplane.server.model_double.script import Script, Step, Usage
from agentplane.server.tenants import TenantRegistry, hash_token
from agentplane.v1 import budget_pb2, budget_pb2_grpc, session_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    MODEL,
    TOKENS,
    Harness,
    error_details,
    short_dir,
    start_harness,
    stop_harness,
    tenant_toml,
    tenants_toml,
)
from replicas_harness import start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KEY = "AGENTPLANE_TEST_ACME_KEY"
TOKEN = {"steady": "steady-token", "gone": "gone-token", "newco": "newco-token"}


def extra(**steady: object) -> str:
    """Two tenants of this module's: `steady` (with `steady` over its settings), `gone`."""
    settings: dict[str, object] = {
        "anthropic_api_key_env": KEY,
        "allowed_tools": ["Read", "Glob"],
        "system_prompt": "You are the OLD steady prompt.",
        "daily_limit_usd": 20.0,
        "max_session_budget_usd": 1.0,
        **steady,
    }
    return "\n".join(
        [
            tenant_toml("steady", TOKEN["steady"], **settings),  # type: ignore[arg-type]
            tenant_toml("gone", TOKEN["gone"], anthropic_api_key_env=KEY, allowed_tools=["Read"]),
        ]
    )


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def until(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 60
) -> None:
    """Wait for `check` to hold (an event, not a time limit on behaviour)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


# -- the registry itself ------------------------------------------------------------------


def test_a_replacement_says_what_changed_and_never_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(tenant_toml("a", "tok-a") + tenant_toml("b", "tok-b", max_turns=3))
    registry = TenantRegistry.load(path)
    path.write_text(
        tenant_toml("a", "tok-a2")
        + tenant_toml("c", "tok-c")
        + tenant_toml("b", "tok-b", max_turns=3)
    )
    changes = registry.replace(TenantRegistry.load(path))
    assert (changes.added, changes.removed) == (("c",), ())
    assert dict(changes.changed) == {"a": ("token_sha256",)}
    assert registry.authenticate("Bearer tok-a2").name == "a"
    with pytest.raises(Unauthenticated):
        registry.authenticate("Bearer tok-a")
    assert not registry.replace(TenantRegistry.load(path))  # the same file: no change


def test_a_certificate_identity_is_bound_to_one_tenant_only(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        tenant_toml("a", client_cert_sans=["x.internal"])
        + tenant_toml("b", client_cert_sans=["x.internal"])
    )
    with pytest.raises(
        ConfigError, match=r"tenants\.b\.client_cert_sans.*also listed for tenant a"
    ):
        TenantRegistry.load(path)
    path.write_text(
        tenant_toml("a", client_cert_subjects=["CN=x, O=y"])
        + tenant_toml("b", client_cert_subjects=["o=y,cn=x"])
    )
    with pytest.raises(ConfigError, match="client_cert_subjects"):
        TenantRegistry.load(path)
    path.write_text(tenant_toml("a", client_cert_subjects=["not a name"]))
    with pytest.raises(ConfigError, match="is not a distinguished name"):
        TenantRegistry.load(path)
    path.write_text(tenant_toml("a", max_turns=3))
    with pytest.raises(ConfigError, match="token hash is required.*client certificate"):
        TenantRegistry.load(path)


# -- a live server, reloading on change --------------------------------------------------------


@pytest.fixture(scope="module")
async def h(database_url: str) -> AsyncIterator[Harness]:
    harness = await start_harness(database_url, extra_tenants=extra())
    yield harness
    await stop_harness(harness)


def rewrite(
    h: Harness, *, acme_token: str = TOKENS["acme"], more: str = "", **steady: object
) -> None:
    """Write the harness's tenants file anew: its tenants (acme with `acme_token`), this
    module's (`steady` changed by `steady`), then `more`."""
    text = tenants_toml(h.workspace).replace(hash_token(TOKENS["acme"]), hash_token(acme_token))
    (h.work_dir / "tenants.toml").write_text(text + "\n" + extra(**steady) + "\n" + more)


async def changed_on_disk(h: Harness, write: Callable[[], None]) -> None:
    """`write` the file, then wait for the server's watcher to have applied it."""
    reloader = h.app.reloader
    assert reloader is not None
    before = reloader.reloads
    write()
    await until(lambda: reloader.reloads > before, "the changed file was applied")


async def budget(h: Harness, token: str) -> budget_pb2.Budget:
    return await budget_pb2_grpc.BudgetServiceStub(h.channel).GetBudget(
        budget_pb2.GetBudgetRequest(), metadata=auth(token)
    )


async def tenants_health(h: Harness) -> int:
    reply = await health_pb2_grpc.HealthStub(h.channel).Check(
        health_pb2.HealthCheckRequest(service=TENANTS)
    )
    return int(reply.status)


async def run(h: Harness, token: str, prompt: str) -> list[session_pb2.SessionEvent]:
    """RunSession to the end; its events."""
    call = h.sessions.RunSession(
        session_pb2.RunSessionRequest(prompt=prompt, model=MODEL), metadata=auth(token)
    )
    return [event async for event in call]


async def to_end(call: grpc.aio.UnaryStreamCall) -> session_pb2.SessionEvent:
    """Read a RunSession call to its end; its last event."""
    last = None
    while (event := await call.read()) is not grpc.aio.EOF:
        last = event
    assert last is not None
    return last


@pytest.fixture
async def restore(h: Harness) -> AsyncIterator[None]:
    """Each test leaves the original tenants file in force."""
    yield
    rewrite(h)
    assert await h.app.reload_tenants("test") is not None


async def test_a_removed_token_a_lowered_limit_and_a_new_tenant_apply_at_once(
    h: Harness, restore: None, caplog: pytest.LogCaptureFixture
) -> None:
    h.sandbox.add_script("reload_spend", Script(steps=[Step(text="spent", usage=Usage(2000, 50))]))
    events = await run(h, TOKEN["steady"], "[[sandbox:reload_spend]] hi")
    assert events[-1].result.session.state == session_pb2.SESSION_STATE_COMPLETE
    assert (await budget(h, TOKENS["acme"])).tenant == "acme"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await budget(h, TOKEN["newco"])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    caplog.set_level(logging.INFO, logger="agentplane.server.tenants.reload")
    await changed_on_disk(
        h,
        lambda: rewrite(
            h,
            acme_token="acme-rotated-token",
            daily_limit_usd=0.000001,
            max_session_budget_usd=0.000001,
            more=tenant_toml("newco", TOKEN["newco"], anthropic_api_key_env=KEY),
        ),
    )

    # The leaked token fails its very next call, on the same connection; the new one works.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await budget(h, TOKENS["acme"])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(caught.value)["ErrorInfo"].reason == "UNAUTHENTICATED"
    assert (await budget(h, "acme-rotated-token")).tenant == "acme"
    assert (await budget(h, TOKEN["newco"])).tenant == "newco"
    # The lowered limit: GetBudget shows it, the next admission is held to it.
    assert (await budget(h, TOKEN["steady"])).limit_usd == "0.000001"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(h, TOKEN["steady"], "again")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value)["ErrorInfo"].reason == "BUDGET_EXCEEDED"

    reloads = [r for r in caplog.records if r.getMessage() == "tenants_reloaded"]
    assert len(reloads) == 1
    line = reloads[0]
    assert (line.trigger, line.added, line.removed) == ("file changed", ["newco"], [])  # type: ignore[attr-defined]
    assert line.changed == {  # type: ignore[attr-defined]
        "acme": ["token_sha256"],
        "steady": ["daily_limit_usd", "max_session_budget_usd"],
    }
    for secret in ("acme-rotated-token", hash_token("acme-rotated-token"), TOKEN["newco"]):
        assert secret not in caplog.text


async def test_an_invalid_file_keeps_the_last_valid_one_and_says_so(
    h: Harness, restore: None, caplog: pytest.LogCaptureFixture
) -> None:
    reloader = h.app.reloader
    assert reloader is not None and await tenants_health(h) == SERVING
    caplog.set_level(logging.INFO, logger="agentplane.server.tenants.reload")
    # Removes acme's token and breaks steady: the file is refused whole.
    rewrite(h, acme_token="acme-other-token", max_session_budget_usd=50.0)
    await until(lambda: reloader.problem is not None, "the invalid file was read")
    reads = reloader.reads
    await until(lambda: reloader.reads >= reads + 2, "the watcher read the file twice more")

    assert await tenants_health(h) == NOT_SERVING
    assert (await budget(h, TOKENS["acme"])).tenant == "acme"  # still in force
    failures = [r for r in caplog.records if r.getMessage() == "tenants_reload_failed"]
    assert len(failures) == 1  # once per version of the file, not once per read
    detail = failures[0].detail  # type: ignore[attr-defined]
    assert "tenants.steady.max_session_budget_usd" in detail and "last valid" in detail
    assert "readiness" not in detail
    ready = await health_pb2_grpc.HealthStub(h.channel).Check(
        health_pb2.HealthCheckRequest(service="readiness")
    )
    assert ready.status == SERVING  # the server still serves, under the old file

    await changed_on_disk(h, lambda: rewrite(h, acme_token="acme-other-token"))
    assert await tenants_health(h) == SERVING and reloader.problem is None
    assert (await budget(h, "acme-other-token")).tenant == "acme"


async def test_a_reload_while_sessions_run(h: Harness, restore: None) -> None:
    h.sandbox.add_script("reload_hold", Script(steps=[Step(hang=True)]))
    h.sandbox.add_script("reload_slow", Script(steps=[Step(text="steady done", delay_s=5)]))

    async def running(token: str, script: str) -> grpc.aio.UnaryStreamCall:
        """A session whose model request is in flight."""
        call = h.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt=f"[[sandbox:{script}]] go", model=MODEL),
            metadata=auth(token),
        )
        await call.read()  # admitted
        await until(lambda: bool(h.sandbox.find(script=script)), f"{script} asked the model")
        return call

    held = await running(TOKEN["gone"], "reload_hold")
    slow = await running(TOKEN["steady"], "reload_slow")

    # gone removed; steady narrowed: fewer tools, a smaller session budget, a new prompt.
    (h.work_dir / "tenants.toml").write_text(
        tenants_toml(h.workspace)
        + "\n"
        + tenant_toml(
            "steady",
            TOKEN["steady"],
            anthropic_api_key_env=KEY,
            allowed_tools=["Read"],
            system_prompt="You are the NEW steady prompt.",
            daily_limit_usd=20.0,
            max_session_budget_usd=0.5,
        )
    )
    changes = await h.app.reload_tenants("test")
    assert changes is not None and changes.removed == ("gone",)
    assert not h.sandbox.find(script="reload_slow")[0].status, "ended before the reload"

    final = (await to_end(held)).result.session
    assert final.state == session_pb2.SESSION_STATE_ERROR
    assert final.error.reason == session_pb2.ERROR_REASON_CANCELLED
    assert "removed from the tenants file" in final.error.message
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await budget(h, TOKEN["gone"])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The running session finishes under the policy it was admitted with...
    done = (await to_end(slow)).result.session
    assert done.state == session_pb2.SESSION_STATE_COMPLETE and done.result == "steady done"
    assert list(done.allowed_tools) == ["Read", "Glob"] and done.max_budget_usd == "1.000000"
    # ...and the next one runs under the new policy.
    h.sandbox.add_script("reload_next", Script(steps=[Step(text="next", usage=Usage(100, 5))]))
    after = (await run(h, TOKEN["steady"], "[[sandbox:reload_next]] hi"))[-1].result.session
    assert list(after.allowed_tools) == ["Read"] and after.max_budget_usd == "0.500000"
    prompts = {
        name: json.dumps([r.body.get("system") for r in h.sandbox.find(script=name) if r.body])
        for name in ("reload_slow", "reload_next")
    }
    assert "OLD steady prompt" in prompts["reload_slow"] and "NEW" not in prompts["reload_slow"]
    assert "NEW steady prompt" in prompts["reload_next"] and "OLD" not in prompts["reload_next"]


# -- SIGHUP, to a server process -----------------------------------------------------------------


async def test_sighup_reloads_the_tenants_file(database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("one server process is enough: the reload does not touch the database")
    work = short_dir("hup")
    workspace = work / "tpl"
    workspace.mkdir()
    path = work / "tenants.toml"
    path.write_text(tenants_toml(workspace))
    sandbox = SandboxServer()
    await sandbox.start()
    # The watcher is (all but) off: only the signal can apply the file.
    server = await start_server(
        work, f"sqlite:///{work}/hup.db", sandbox.base_url, AGENTPLANE_TENANTS_POLL_S="3600"
    )
    try:
        budgets = budget_pb2_grpc.BudgetServiceStub(server.channel)

        async def tenant_of(token: str) -> str | grpc.StatusCode:
            try:
                reply = await budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=auth(token))
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return reply.tenant

        assert await tenant_of(TOKENS["acme"]) == "acme"
        path.write_text(
            tenants_toml(workspace).replace(
                hash_token(TOKENS["acme"]), hash_token("acme-after-hup")
            )
            + tenant_toml("newco", TOKEN["newco"], anthropic_api_key_env=KEY)
        )
        assert await tenant_of(TOKEN["newco"]) == grpc.StatusCode.UNAUTHENTICATED
        server.proc.send_signal(signal.SIGHUP)
        await until(lambda: _is(tenant_of(TOKEN["newco"]), "newco"), "SIGHUP applied the file")
        assert await tenant_of(TOKENS["acme"]) == grpc.StatusCode.UNAUTHENTICATED
        assert await tenant_of("acme-after-hup") == "acme"

        path.write_text("[tenants.broken\n")
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_status(NOT_SERVING, TENANTS)
        assert await tenant_of(TOKEN["newco"]) == "newco"
        assert await server.status("readiness") == SERVING

        logged = [json.loads(line) for line in server.log_lines() if line.startswith("{")]
        reloads = [e for e in logged if e.get("event") == "tenants_reloaded"]
        assert [(e["trigger"], e["added"], e["changed"]) for e in reloads] == [
            ("SIGHUP", ["newco"], {"acme": ["token_sha256"]})
        ]
        failed = [e for e in logged if e.get("event") == "tenants_reload_failed"]
        assert len(failed) == 1 and "not valid TOML" in failed[0]["detail"]
        text = server.log.read_text()
        assert "acme-after-hup" not in text and hash_token("acme-after-hup") not in text
    finally:
        server.terminate()
        await server.wait()
        await server.channel.close()
        await sandbox.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _is(value: Awaitable[object], expected: object) -> bool:
    return await value == expected
