"""A real webhook receiver on loopback for tests: an aiohttp server that verifies each
request with the Standard Webhooks library, records it, and answers as a test planned.

    receiver = WebhookReceiver(secret); await receiver.start()
    receiver.plan("/cb/flaky", [500, 500])        # then 200
    release = receiver.hold("/slow")               # the next request waits for release.set()
    got = await receiver.wait(lambda r: r.path == "/cb/flaky", count=3)
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

# Waits end on the receiver's events; this only stops a broken test from hanging.
SAFETY_TIMEOUT_S = 120.0


def new_secret() -> str:
    """A signing secret as the tenants file's variable holds it."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def dead_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    # The verified payload (None: the signature did not verify).
    payload: Any
    status: int

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def verified(self) -> bool:
        return self.payload is not None


class WebhookReceiver:
    """Verifies with `secret`; answers a path's planned statuses in order, then 200;
    paths under /redirect are answered 302 to /target."""

    def __init__(self, secret: str) -> None:
        self._verifier = Webhook(secret)
        self.received: list[Received] = []
        self._plans: dict[str, list[int]] = {}
        self._holds: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self, path: str, statuses: list[int]) -> None:
        self._plans[path] = list(statuses)

    def hold(self, path: str) -> asyncio.Event:
        """Hold the next request to `path` unanswered (it is recorded at once) until the
        returned event is set."""
        self._holds[path] = asyncio.Event()
        return self._holds[path]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            payload = self._verifier.verify(body, headers)
        except WebhookVerificationError:
            payload = None
        plan = self._plans.get(request.path)
        status = plan.pop(0) if plan else 200
        if request.path.startswith("/redirect"):
            status = 302
        async with self._changed:
            self.received.append(Received(request.path, headers, body, payload, status))
            self._changed.notify_all()
        held = self._holds.pop(request.path, None)
        if held is not None:
            await held.wait()
        if status == 302:
            raise web.HTTPFound(f"{self.base}/target")
        return web.Response(status=status, text="ok" if status < 300 else "no")

    def matching(self, match: Callable[[Received], bool]) -> list[Received]:
        return [r for r in self.received if match(r)]

    async def wait(self, match: Callable[[Received], bool], count: int = 1) -> list[Received]:
        """The first `count` requests that `match`, once they arrived."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.matching(match)) >= count),
                SAFETY_TIMEOUT_S,
            )
        return self.matching(match)[:count]
