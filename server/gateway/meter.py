"""One session's meter: its budget, the reservations of requests in flight, the record.

Money rule: before a request is forwarded its worst case (estimated input tokens at the
dearest input price plus ``max_tokens`` at the output price, at the rates of a request of
that size, plus, for each metered server tool it offers, ``max_uses`` uses at their price
and :data:`SERVER_TOOL_RESULT_TOKENS` of results per use) is reserved out of
``budget - spent - reserved``; ``max_tokens`` is lowered to what that covers, and when
even the smallest useful ``max_tokens`` does not fit, the tools' ``max_uses`` are lowered
until it does. When the response ends the reservation is released and the response's priced
usage is added to ``spent``. Output can never exceed the forwarded ``max_tokens`` nor uses
the forwarded ``max_uses``, so a session's spend passes its budget only by the error of
the input estimate (actual input tokens, or results, above the estimate, at the dearest
input price; and the long-context premium of a request estimated below its model's
threshold that turned out above it).

:meth:`SessionMeter.reserve` and :meth:`SessionMeter.settle` are synchronous: each runs
on the event loop without an ``await`` between reading and updating the totals, so
concurrent requests of one session are serialized exactly as by a lock, and settling
in a ``finally`` of a cancelled request cannot be interrupted.
"""

from __future__ import annotations

import binascii
import logging
import math
import re
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from ..domain import TokenUsage, usd, utcnow
from ..mcp.servers import RemoteServer
from ..money.pricing import ModelPrice
from .server_tools import OfferedTool
from .sse import ResponseFacts

log = logging.getLogger(__name__)

THINKING_MIN_BUDGET = 1024  # the API's minimum thinking.budget_tokens
# Input tokens reserved per server-tool use for what it adds to the prompt (a search's
# results are billed as input tokens): a generous allowance, not a bound (an estimate).
SERVER_TOOL_RESULT_TOKENS = 10_000
# The server-tool uses a request may have per tool when the tenant does not say.
DEFAULT_MAX_SERVER_TOOL_USES = 8
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 3000  # per image: about twice what the API bills for the largest
# Per PDF page the API bills the page's text (1,500-3,000 tokens, it documents) and the page
# as an image: the top of that range plus IMAGE_TOKENS.
PDF_PAGE_TOKENS = 3000 + IMAGE_TOKENS
# A document the gateway cannot see (a URL or a Files API file): the API's 100-page limit.
UNSEEN_DOCUMENT_TOKENS = 100 * PDF_PAGE_TOKENS
# A PDF page object: `/Type /Page` (not `/Pages`), however it is spaced.
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z0-9#])")
_NON_ASCII = bytes(range(128, 256))
_MEDIA = (b'"image"', b'"document"', b"\\u")  # a block type, or an escape that may spell one
_TOOL_USES = ("tool_use", "server_tool_use", "mcp_tool_use")


def estimate_input_tokens(raw: bytes, body: dict[str, Any], margin: float) -> int:
    """Estimated input tokens of a Messages request (``body`` is ``raw`` parsed): the
    characters of the raw JSON body / 4, plus its media at what the API bills for them,
    times ``1 + margin``, rounded up. A safe upper bound, computed without a copy of the
    body (it may be 32 MB).

    - Text: every byte of the body but the data of base64 media; each non-ASCII byte
      counts 3 characters (at least a ``\\uXXXX`` escape's 6 per character), for scripts
      with few characters per token.
    - An image (any source) counts :data:`IMAGE_TOKENS`, not its data: the API bills it by
      its pixels, ~1,600 tokens at most after its downscaling.
    - A base64 PDF counts the larger of its data / 4 and :data:`PDF_PAGE_TOKENS` per page
      object found in it (at least one). Pages inside compressed object streams are not
      seen; such a PDF counts by its size.
    - A text document counts as text; a document of content blocks, by its blocks.
    - A document by URL or Files API id counts :data:`UNSEEN_DOCUMENT_TOKENS`.
    """
    chars = len(raw)
    if not raw.isascii():
        chars += 2 * (len(raw) - len(raw.translate(None, _NON_ASCII)))
    media = 0
    if any(marker in raw for marker in _MEDIA):
        for block in _media_blocks([body.get("system"), body.get("messages")]):
            source = block["source"]
            data = source.get("data")
            if source.get("type") == "base64" and isinstance(data, str):
                chars -= len(data)  # never more than its bytes in `raw`
            if block["type"] == "image":
                media += IMAGE_TOKENS
            elif source.get("type") in ("url", "file"):
                media += UNSEEN_DOCUMENT_TOKENS
            elif source.get("type") == "base64" and isinstance(data, str):
                media += _pdf_tokens(data)
    return math.ceil((chars / CHARS_PER_TOKEN + media) * (1 + margin))


def _media_blocks(value: Any) -> Iterator[dict[str, Any]]:
    """The image and document blocks (with a ``source`` object) anywhere in ``value``,
    in tool results' and documents' content too; iterative (any depth). A tool use's
    ``input`` is the model's own JSON, billed as text: not searched."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            kind = item.get("type")
            if kind in ("image", "document") and isinstance(item.get("source"), dict):
                yield item
            stack.extend(
                v
                for k, v in item.items()
                if isinstance(v, list | dict) and not (k == "input" and kind in _TOOL_USES)
            )


def _pdf_tokens(data: str) -> int:
    """What a base64 PDF counts (see :func:`estimate_input_tokens`)."""
    try:
        pdf = binascii.a2b_base64(data)
    except (binascii.Error, ValueError):  # not base64 (the API will refuse it): its size
        pdf = b""
    pages = max(1, sum(1 for _ in _PDF_PAGE.finditer(pdf)))
    return max(math.ceil(len(data) / CHARS_PER_TOKEN), pages * PDF_PAGE_TOKENS)


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
    # When a streamed response's first bytes arrived (time to first chunk).
    first_chunk_at: datetime | None = None
    outcome: str = ""
    stream: bool = False
    input_tokens_estimate: int = 0
    reserved_usd: Decimal = Decimal(0)
    thinking_budget_requested: int | None = None
    thinking_budget_forwarded: int | None = None
    # The max_uses each metered server tool was forwarded with, by its usage unit.
    server_tool_uses_forwarded: dict[str, int] = field(default_factory=dict)
    price_version: str = ""
    upstream_request_id: str = ""
    response: ResponseFacts = field(default_factory=ResponseFacts)
    request_body: bytes | None = None


@dataclass(frozen=True)
class Reservation:
    """What a request may spend: its worst case at the ``max_tokens`` (and the server
    tools' ``max_uses``, by their index in ``tools``) it is sent with."""

    price: ModelPrice
    amount_usd: Decimal
    input_tokens_estimate: int
    max_tokens: int
    uses: Mapping[int, int] = field(default_factory=dict)


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
        tools: Collection[str] | None = None,
        max_server_tool_uses: int = DEFAULT_MAX_SERVER_TOOL_USES,
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
        # A session that pauses at its budget: the gateway awaits this with a request its
        # budget cannot cover; True once the budget was raised (reserve again), False to
        # refuse it. None: refused at once (the session ends).
        self.hold: Callable[[], Awaitable[bool]] | None = None
        # The remote MCP servers the session may reach through the gateway's relay.
        self.mcp_servers: Mapping[str, RemoteServer] = {}
        # The session's tools (None: any), which say which server tools it may use, and
        # the most uses a request may have of each.
        self.tools = frozenset(tools) if tools is not None else None
        self.max_server_tool_uses = max_server_tool_uses

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
    def cost_by_model(self) -> dict[str, Decimal]:
        """What the requests settled so far cost, by the model they asked for."""
        costs: dict[str, Decimal] = {}
        for request in self.requests:
            costs[request.model] = costs.get(request.model, Decimal(0)) + request.cost_usd
        return costs

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
        tools: Sequence[OfferedTool] = (),
    ) -> Reservation | None:
        """Hold the request's worst case, lowering ``max_tokens`` to what the remaining
        budget covers (and, when even ``min(max_tokens, min_output_tokens)`` does not fit,
        the ``max_uses`` of its server ``tools``, down to 1 each); None (and
        ``exhausted``) when that is not enough."""
        remaining = self.remaining_usd
        uses = {tool.index: tool.uses(self.max_server_tool_uses) for tool in tools}
        units = {tool.index: tool.unit for tool in tools}

        def worst(count: int) -> Decimal:
            return price.worst_case(
                _prompt(input_tokens_estimate, uses),
                count,
                long_cache=long_cache,
                uses=_by_unit(uses, units),
            )

        forwarded = max_tokens
        amount = worst(max_tokens)
        if amount > remaining:
            floor = min(max_tokens, min_output_tokens)
            while worst(floor) > remaining:
                if not uses or max(uses.values()) <= 1:
                    self.exhausted = True
                    return None
                most = max(uses, key=lambda index: uses[index])
                uses[most] -= 1
            forwarded = min(
                max_tokens,
                price.max_output_tokens(
                    remaining,
                    _prompt(input_tokens_estimate, uses),
                    long_cache=long_cache,
                    uses=_by_unit(uses, units),
                ),
            )
            if forwarded < floor or forwarded < 1:
                self.exhausted = True
                return None
            amount = worst(forwarded)
        self.reserved_usd += amount
        self.in_flight += 1
        return Reservation(price, amount, input_tokens_estimate, forwarded, uses)

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


def _prompt(input_tokens_estimate: int, uses: Mapping[int, int]) -> int:
    """The input tokens of a request at its worst: its estimate and every use's results."""
    return input_tokens_estimate + SERVER_TOOL_RESULT_TOKENS * sum(uses.values())


def _by_unit(uses: Mapping[int, int], units: Mapping[int, str]) -> dict[str, int]:
    by_unit: dict[str, int] = {}
    for index, count in uses.items():
        by_unit[units[index]] = by_unit.get(units[index], 0) + count
    return by_unit


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
