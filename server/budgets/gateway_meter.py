"""One session's meter: its budget, the reservations of requests in flight, the record.

Money rule: before a request is forwarded its worst case (estimated input tokens at the
dearest input price plus ``max_tokens`` at the output price) is reserved out of
``budget - spent - reserved``; ``max_tokens`` is lowered to what that covers. When the
response ends the reservation is released and the response's priced usage is added to
``spent``. Output can never exceed the forwarded ``max_tokens``, so a session's spend
passes its budget only by the error of the input estimate (actual input tokens above the
estimate, at the dearest input price).

:meth:`SessionMeter.reserve` and :meth:`SessionMeter.settle` are synchronous: each runs
on the event loop without an ``await`` between reading and updating the totals, so
concurrent requests of one session are serialized exactly as by a lock, and settling
in a ``finally`` of a cancelled request cannot be interrupted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from ..domain import TokenUsage, usd, utcnow
from ..mcp.servers import RemoteServer
from .gateway_sse import ResponseFacts
from .pricing import ModelPrice

log = logging.getLogger(__name__)

THINKING_MIN_BUDGET = 1024  # the API's minimum thinking.budget_tokens
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 3000  # per base64 image: about twice what the API bills for the largest


def estimate_input_tokens(body: dict[str, Any], margin: float) -> int:
    """Estimated input tokens of a Messages request: the characters of its JSON-encoded
    ``system``, ``messages`` and ``tools`` / 4, times ``1 + margin``, rounded up.

    Non-ASCII characters count as their 6-character ``\\uXXXX`` escapes, which keeps
    the estimate on the safe side for scripts with few characters per token. A base64
    image counts as :data:`IMAGE_TOKENS` instead of its data (the API bills an image by
    its pixels, ~1,600 tokens at most after its downscaling, not by its bytes).
    """
    parts, images = _without_images([body.get("system"), body.get("messages"), body.get("tools")])
    text = json.dumps(parts, separators=(",", ":"))
    return math.ceil((len(text) / CHARS_PER_TOKEN + images * IMAGE_TOKENS) * (1 + margin))


def _without_images(value: Any) -> tuple[Any, int]:
    """``value`` with the data of base64 images emptied, and how many there were."""
    if isinstance(value, list):
        items = [_without_images(item) for item in value]
        return [item for item, _ in items], sum(count for _, count in items)
    if not isinstance(value, dict):
        return value, 0
    source = value.get("source")
    if value.get("type") == "image" and isinstance(source, dict) and source.get("type") == "base64":
        return {**value, "source": {**source, "data": ""}}, 1
    stripped = {key: _without_images(item) for key, item in value.items()}
    return (
        {key: item for key, (item, _) in stripped.items()},
        sum(count for _, count in stripped.values()),
    )


@dataclass
class MeteredRequest:
    """One model request of a session, as the gateway metered it.

    ``status`` is the HTTP status sent to the agent. ``outcome``: ``completed``,
    ``refused`` (budget or unknown model; not forwarded), ``invalid`` (not forwarded),
    ``upstream_error`` (an error status from upstream; costs nothing),
    ``upstream_failed`` (no response from upstream), ``upstream_dropped`` (the stream
    broke off; what was seen is charged), ``client_disconnected`` (the agent went away;
    what was seen is charged), ``usage_missing`` (a success without readable usage;
    charged its reservation, the worst case). ``usage`` is what the response reported
    (zero when it was not forwarded, or reported none), ``response`` its message id,
    model and stop reason. ``request_body`` (the body as forwarded) and
    ``response.content`` are kept only when the gateway keeps content for traces.
    """

    model: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    cost_usd: Decimal = Decimal(0)
    max_tokens_requested: int | None = None
    max_tokens_forwarded: int | None = None
    status: int | None = None
    started_at: datetime = field(default_factory=utcnow)
    ended_at: datetime | None = None
    outcome: str = ""
    stream: bool = False
    input_tokens_estimate: int = 0
    reserved_usd: Decimal = Decimal(0)
    thinking_budget_requested: int | None = None
    thinking_budget_forwarded: int | None = None
    price_version: str = ""
    upstream_request_id: str = ""
    response: ResponseFacts = field(default_factory=ResponseFacts)
    request_body: bytes | None = None


@dataclass(frozen=True)
class Reservation:
    """What a request may spend: its worst case at the ``max_tokens`` it is sent with."""

    price: ModelPrice
    amount_usd: Decimal
    input_tokens_estimate: int
    max_tokens: int


class SessionMeter:
    """The budget and the metered requests of one session (see the module docstring).

    ``token`` is what the session's CLI sends as its API key; the tenant's real key is
    kept private and never shown by ``repr``.
    """

    def __init__(
        self,
        session_id: str,
        *,
        budget_usd: Decimal,
        upstream_base_url: str,
        upstream_api_key: str,
        token: str,
    ) -> None:
        self.session_id = session_id
        self.budget_usd = usd(budget_usd)
        self.upstream_base_url = upstream_base_url.rstrip("/")
        self._upstream_api_key = upstream_api_key
        self.token = token
        self.spent_usd = usd(0)
        self.reserved_usd = usd(0)
        self.requests: list[MeteredRequest] = []
        self.exhausted = False
        self.closed = False
        self.in_flight = 0
        self.on_request: Callable[[MeteredRequest], None] | None = None
        # The remote MCP servers the session may reach through the gateway's relay.
        self.mcp_servers: Mapping[str, RemoteServer] = {}

    @property
    def upstream_api_key(self) -> str:
        return self._upstream_api_key

    @property
    def remaining_usd(self) -> Decimal:
        """What new requests may still reserve (may be negative after an overshoot)."""
        return self.budget_usd - self.spent_usd - self.reserved_usd

    @property
    def usage(self) -> TokenUsage:
        """The tokens of every request settled so far, as upstream reported them."""
        total = TokenUsage()
        for request in self.requests:
            total = total.plus(request.usage)
        return total

    @property
    def answered(self) -> int:
        """How many requests upstream answered in full (each one turn of the agent's)."""
        return sum(1 for request in self.requests if request.outcome == "completed")

    def __repr__(self) -> str:
        return (
            f"SessionMeter(session_id={self.session_id!r}, budget_usd={self.budget_usd}, "
            f"spent_usd={self.spent_usd}, reserved_usd={self.reserved_usd}, "
            f"requests={len(self.requests)}, exhausted={self.exhausted})"
        )

    # -- money -------------------------------------------------------------------------

    def reserve(
        self,
        price: ModelPrice,
        input_tokens_estimate: int,
        max_tokens: int,
        *,
        min_output_tokens: int,
        long_cache: bool = False,
    ) -> Reservation | None:
        """Hold the request's worst case, lowering ``max_tokens`` to what the remaining
        budget covers; None (and ``exhausted``) when that is below the useful minimum
        (``min(max_tokens, min_output_tokens)``)."""
        remaining = self.remaining_usd
        worst = price.worst_case(input_tokens_estimate, max_tokens, long_cache=long_cache)
        forwarded = max_tokens
        if worst > remaining:
            forwarded = min(
                max_tokens,
                price.max_output_tokens(remaining, input_tokens_estimate, long_cache=long_cache),
            )
            if forwarded < min(max_tokens, min_output_tokens) or forwarded < 1:
                self.exhausted = True
                return None
            worst = price.worst_case(input_tokens_estimate, forwarded, long_cache=long_cache)
        self.reserved_usd += worst
        self.in_flight += 1
        return Reservation(price, worst, input_tokens_estimate, forwarded)

    def settle(self, reservation: Reservation | None, record: MeteredRequest) -> None:
        """Release ``reservation``, add ``record.cost_usd`` to spent, record the request."""
        if reservation is not None:
            self.reserved_usd -= reservation.amount_usd
            self.in_flight -= 1
        self.spent_usd += record.cost_usd
        if record.ended_at is None:
            record.ended_at = utcnow()
        self.requests.append(record)
        self._notify(record)

    def _notify(self, record: MeteredRequest) -> None:
        # The callback runs inside settle, often in a `finally`: its failure is logged,
        # never raised into the request that is being settled.
        callback = self.on_request
        if callback is None:
            return
        try:
            callback(record)
        except Exception:
            log.exception("on_request callback failed for session %s", self.session_id)


def fit_body(body: dict[str, Any], max_tokens: int) -> tuple[dict[str, Any], int | None]:
    """``body`` with ``max_tokens`` lowered, and the thinking budget it is sent with.

    An enabled thinking budget must stay below ``max_tokens``: it is lowered to
    ``max_tokens - 1``, or thinking is dropped when that is under the API's minimum
    (1024), along with ``clear_thinking`` context edits, which need thinking on.
    """
    fitted = dict(body)
    fitted["max_tokens"] = max_tokens
    thinking = body.get("thinking")
    budget = thinking_budget(body)
    if budget is None or budget < max_tokens:
        return fitted, budget
    assert isinstance(thinking, dict)
    if max_tokens - 1 >= THINKING_MIN_BUDGET:
        fitted["thinking"] = {**thinking, "budget_tokens": max_tokens - 1}
        return fitted, max_tokens - 1
    del fitted["thinking"]
    context = body.get("context_management")
    if isinstance(context, dict) and isinstance(context.get("edits"), list):
        edits = [
            e
            for e in context["edits"]
            if not (isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking"))
        ]
        if edits:
            fitted["context_management"] = {**context, "edits": edits}
        else:
            rest = {k: v for k, v in context.items() if k != "edits"}
            if rest:
                fitted["context_management"] = rest
            else:
                del fitted["context_management"]
    return fitted, None


def thinking_budget(body: dict[str, Any]) -> int | None:
    """The ``budget_tokens`` of enabled thinking, if the request has one."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    return budget if isinstance(budget, int) and not isinstance(budget, bool) else None
