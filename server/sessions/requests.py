"""What a caller asks for, and its validation against the tenant's policy."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from ..domain import usd
from ..errors import InvalidArgument, quote
from ..tenants import Tenant

MAX_PROMPT_CHARS = 200_000
MAX_LABELS = 32
_LABEL_KEY = re.compile(r"[a-z0-9_.-]{1,63}")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)
# What every session id is (str(uuid4())): anything else cannot name a session.
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


def no_nul(field: str, value: str) -> None:
    """InvalidArgument on `field` if `value` holds a NUL (no database stores one in text)."""
    if "\0" in value:
        raise InvalidArgument(field, "must not contain NUL characters")


@dataclass(frozen=True)
class RunRequest:
    """A RunSession request in domain terms (empty/zero fields mean "the default")."""

    prompt: str
    request_id: str = ""
    max_budget_usd: str = ""
    max_turns: int = 0
    allowed_tools: tuple[str, ...] = ()
    model: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    on_disconnect_continue: bool = False
    resume_session_id: str = ""


@dataclass(frozen=True)
class SessionSpec:
    """A validated request with the tenant's defaults filled in."""

    prompt: str
    budget_usd: Decimal
    max_turns: int
    tools: tuple[str, ...]
    model: str
    labels: dict[str, str]
    request_id: str
    on_disconnect_continue: bool
    max_duration_s: float = 3600.0
    # The earlier agentplane session to continue, and (once resolved) its SDK session id.
    resume_session_id: str = ""
    resume_sdk_session_id: str = ""

    def fingerprint(self) -> str:
        """A hash of the request body, to tell a true repeat of a request_id from a reuse."""
        body = {
            "prompt": self.prompt,
            "budget": str(self.budget_usd),
            "max_turns": self.max_turns,
            "tools": list(self.tools),
            "model": self.model,
            "labels": self.labels,
            "resume": self.resume_session_id,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _budget(raw: str, tenant: Tenant) -> Decimal:
    if not raw.strip():
        return usd(tenant.max_session_budget_usd)
    # ASCII digits only: Decimal() would also take "１" (fullwidth), "1_0" and "1e3".
    if not _DECIMAL.fullmatch(raw.strip()):
        raise InvalidArgument(
            "max_budget_usd", f"{quote(raw)} is not a decimal number of US dollars like 0.25"
        )
    amount = Decimal(raw.strip())
    if amount <= 0:
        raise InvalidArgument("max_budget_usd", f"must be greater than 0, not {quote(raw)}")
    if amount > tenant.max_session_budget_usd:
        raise InvalidArgument(
            "max_budget_usd",
            f"{quote(raw)} is above the tenant's per-session maximum of "
            f"{tenant.max_session_budget_usd} USD",
        )
    amount = usd(amount)
    if amount == 0:
        raise InvalidArgument("max_budget_usd", "must be at least 0.000001")
    return amount


def _turns(raw: int, tenant: Tenant) -> int:
    if raw == 0:
        return tenant.max_turns
    if raw < 0 or raw > tenant.max_turns:
        raise InvalidArgument(
            "max_turns", f"must be between 1 and the tenant's maximum {tenant.max_turns}, not {raw}"
        )
    return raw


def _tools(raw: tuple[str, ...], tenant: Tenant) -> tuple[str, ...]:
    if not raw:
        return tenant.allowed_tools
    outside = [t for t in raw if t not in tenant.allowed_tools]
    if outside:
        raise InvalidArgument(
            "allowed_tools",
            f"{', '.join(sorted(set(outside)))} not in the tenant's tools "
            f"({', '.join(tenant.allowed_tools) or 'none'})",
        )
    return tuple(dict.fromkeys(raw))


def check_labels(raw: dict[str, str]) -> dict[str, str]:
    """Labels as RunSession stores them and ListSessions filters by them (InvalidArgument
    on `labels` otherwise: at most MAX_LABELS, keys 1-63 chars of [a-z0-9_.-], values at
    most 256 chars), sorted by key."""
    if len(raw) > MAX_LABELS:
        raise InvalidArgument("labels", f"at most {MAX_LABELS} labels, not {len(raw)}")
    for key, value in raw.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"labels[{quote(key)}]", "keys are 1-63 chars of [a-z0-9_.-]")
        if len(value) > 256:
            raise InvalidArgument(f"labels[{key!r}]", "values are at most 256 chars")
        no_nul(f"labels[{key!r}]", value)
    return dict(sorted(raw.items()))


def validate(request: RunRequest, tenant: Tenant) -> SessionSpec:
    """Check a request against the tenant's policy; raises InvalidArgument naming the field."""
    if not request.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    no_nul("prompt", request.prompt)
    no_nul("model", request.model)
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument("prompt", f"is longer than {MAX_PROMPT_CHARS} characters")
    if request.request_id:
        try:
            uuid.UUID(request.request_id)
        except ValueError:
            raise InvalidArgument("request_id", "must be a UUID") from None
    if len(request.model) > 128:
        raise InvalidArgument("model", "is longer than 128 characters")
    if request.resume_session_id:
        try:
            uuid.UUID(request.resume_session_id)
        except ValueError:
            raise InvalidArgument("resume_session_id", "must be a session id (a UUID)") from None
    return SessionSpec(
        prompt=request.prompt,
        budget_usd=_budget(request.max_budget_usd, tenant),
        max_turns=_turns(request.max_turns, tenant),
        tools=_tools(request.allowed_tools, tenant),
        model=request.model.strip(),
        labels=check_labels(request.labels),
        request_id=str(uuid.UUID(request.request_id)) if request.request_id else "",
        on_disconnect_continue=request.on_disconnect_continue,
        max_duration_s=tenant.max_duration_s,
        resume_session_id=(
            str(uuid.UUID(request.resume_session_id)) if request.resume_session_id else ""
        ),
    )
