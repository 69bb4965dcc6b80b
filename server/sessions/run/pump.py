"""The message pump: one CLI's messages become the session's events, until its result.

It also enforces the stops that need the agent's cooperation: on a cancel request, or
when the agent is silent for longer than the idle timeout or runs past its maximum
duration (the CLI itself notices a stalled model stream only after 300 s), the agent is
interrupted and read briefly on for its error result, so what it used is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from claude_agent_sdk import ClaudeSDKClient, ResultMessage, StreamEvent, SystemMessage

from ...domain import ErrorReason, EventKind
from ..live import LiveSession
from .translate import TextDeltas, to_events


async def pump(
    client: ClaudeSDKClient,
    live: LiveSession,
    *,
    end_at: float,
    max_duration_s: float,
    idle_timeout_s: float,
    interrupt_grace_s: float,
) -> ResultMessage | None:
    """Publish the client's messages as `live`'s events until the result (None: the
    output ended without one, or the agent did not stop in time after an interrupt).
    `end_at` is the event-loop time the session must end by."""
    messages = client.receive_response().__aiter__()
    cancel = asyncio.create_task(live.cancel_requested.wait())
    last = _now()
    interrupt_deadline: float | None = None
    deltas = TextDeltas()
    # One pending read at a time, never cancelled while the agent may still answer:
    # cancelling an async generator's __anext__ closes it and loses the result.
    pull: asyncio.Future[Any] | None = None
    try:
        while True:
            if pull is None:
                pull = asyncio.ensure_future(messages.__anext__())
            if interrupt_deadline is None:
                # Waiting for the caller is not idleness: its own timeout bounds it.
                idle_from = max(last, live.input_settled_at)
                wake_at = min(idle_from + idle_timeout_s, end_at)
                if live.awaiting_caller:
                    wake_at = min(_now() + idle_timeout_s, end_at)
                done, _ = await asyncio.wait(
                    {pull, cancel},
                    timeout=max(0.0, wake_at - _now()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    ran_out = _now() >= end_at
                    idle = _now() >= max(last, live.input_settled_at) + idle_timeout_s
                    if not ran_out and (live.awaiting_caller or not idle):
                        continue
                    live.request_cancel(
                        ErrorReason.TIMEOUT,
                        _timeout_message(idle_timeout_s, max_duration_s, ran_out=ran_out),
                    )
                if pull not in done:
                    interrupt_deadline = _now() + interrupt_grace_s
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.interrupt(), interrupt_grace_s)
                    continue
            else:
                done, _ = await asyncio.wait({pull}, timeout=max(0.0, interrupt_deadline - _now()))
                if not done:  # the agent did not stop in time: its processes get killed
                    pull.cancel()
                    return None
            try:
                message = pull.result()
            except StopAsyncIteration:
                return None
            pull, last = None, _now()
            if isinstance(message, StreamEvent):  # partial messages: live only
                delta = deltas.read(message)
                if delta is not None:
                    live.publish_transient(EventKind.TEXT_DELTA, delta)
                continue
            init = isinstance(message, SystemMessage) and message.subtype == "init"
            if init:
                live.sdk_session_id = str(message.data.get("session_id") or "")
                if message.data.get("model"):  # what runs, also when none was asked for
                    live.session = live.session.evolve(model=str(message.data["model"]))
            for kind, data in to_events(message):
                live.emit(kind, data)
            if init and (failed := failed_servers(message.data)):
                # The agent would run on without their tools (or wait on them): the
                # session ends now, saying which (the init event above shows them too).
                live.request_cancel(
                    ErrorReason.AGENT_FAILED,
                    (
                        f"MCP server {', '.join(failed)} did not start or answer in time"
                        if len(failed) == 1
                        else f"MCP servers {', '.join(failed)} did not start or answer in time"
                    ),
                )
            if isinstance(message, ResultMessage):
                return message
    finally:
        cancel.cancel()


def failed_servers(init: dict[str, Any]) -> list[str]:
    """The MCP servers the CLI's init message reports as failed (or needing an OAuth
    login, which a headless agent cannot do)."""
    servers = init.get("mcp_servers")
    return (
        [
            str(s.get("name"))
            for s in servers
            if isinstance(s, dict) and s.get("status") in ("failed", "needs-auth")
        ]
        if isinstance(servers, list)
        else []
    )


def _now() -> float:
    return asyncio.get_running_loop().time()


def _timeout_message(idle_s: float, max_s: float, *, ran_out: bool) -> str:
    if ran_out:
        return f"the session ran longer than its maximum of {max_s:g} s"
    return f"the agent produced nothing for {idle_s:g} s (AGENTPLANE_SESSION_IDLE_TIMEOUT_S)"
