"""A tenant's webhooks as its `[tenants.<name>.webhooks]` table declares them.

Endpoints (a URL, the events it wants, the signing secret's variable or file), the
callback URLs a request may name, how long a delivery is retried and how many are sent
at once. A secret is never kept here: only where to read it, when a delivery is signed.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yarl import URL

from ..errors import ConfigError, InvalidArgument, quote

SESSION_ENDED = "session.ended"
SESSION_WAITING = "session.waiting"
SESSION_PAUSED = "session.paused"
BUDGET_THRESHOLD = "budget.threshold"
EVENTS = (SESSION_ENDED, SESSION_WAITING, SESSION_PAUSED, BUDGET_THRESHOLD)
# What a request's callback URL is sent: the events of its own session.
CALLBACK_EVENTS = (SESSION_ENDED, SESSION_WAITING, SESSION_PAUSED)
# The name of a request's callback URL among a delivery's targets.
CALLBACK = "callback"

# The Standard Webhooks specification asks for secrets of 24 to 64 bytes.
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
SECRET_HINT = (
    'make one with: python3 -c "import base64,os; '
    "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_URL_CHARS = 2048


class CallbackNotAllowed(InvalidArgument):
    """A request's callback URL outside its tenant's `callback_urls`."""

    reason = "CALLBACK_URL_NOT_ALLOWED"  # still INVALID_ARGUMENT, BadRequest on the field


class SecretUnavailable(Exception):
    """A signing secret cannot be read now; the message names where it is looked for,
    never a value."""


@dataclass(frozen=True)
class Secret:
    """Where a signing secret is read: an environment variable or a file (one of them)."""

    env: str = ""
    file: Path | None = None

    @property
    def where(self) -> str:
        return f"file {self.file}" if self.file is not None else f"variable {self.env}"

    def read(self) -> str:
        """The secret as the Standard Webhooks library takes it (`whsec_<base64>`), read
        now (a rotated secret is used from the next attempt on)."""
        try:
            text = (
                self.file.read_text().strip()
                if self.file is not None
                else os.environ.get(self.env, "").strip()
            )
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretUnavailable(
                f"cannot read the signing secret's {self.where}: {exc}"
            ) from None
        if not text:
            raise SecretUnavailable(f"the signing secret's {self.where} is unset or empty")
        key = text.removeprefix("whsec_")
        try:
            raw = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise SecretUnavailable(
                f"the signing secret in {self.where} is not base64 (whsec_<base64>); " + SECRET_HINT
            ) from None
        if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
            raise SecretUnavailable(
                f"the signing secret in {self.where} is {len(raw)} bytes, not "
                f"{MIN_SECRET_BYTES}..{MAX_SECRET_BYTES}; " + SECRET_HINT
            )
        return f"whsec_{key}"


@dataclass(frozen=True)
class Endpoint:
    """One receiver of a tenant's events."""

    name: str
    url: str
    events: tuple[str, ...]
    secret: Secret


@dataclass(frozen=True)
class WebhookPolicy:
    """A tenant's webhooks. The default (no table) sends nothing and allows no callback."""

    endpoints: tuple[Endpoint, ...] = ()
    # URLs a request's callback_url may name: exactly, or below one ending in "/".
    callback_urls: tuple[str, ...] = ()
    # Signs callbacks, and endpoints without a secret of their own.
    secret: Secret | None = None
    # How long a delivery is retried after its event, and its first retry's delay (it
    # doubles per retry, up to max_retry_delay_s, times a random factor in [0.5, 1]).
    retry_s: float = 86400.0
    first_retry_s: float = 5.0
    max_retry_delay_s: float = 3600.0
    # Deliveries of this tenant in flight at once, per replica.
    max_concurrent: int = 4
    # budget.threshold fires once a day when the day's spend reaches this share of the
    # daily limit (None: never).
    budget_threshold: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints or self.callback_urls)

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.name == name), None)

    def wanting(self, event: str) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if event in e.events)

    def check_callback(self, url: str, field: str = "callback_url") -> str:
        """`url` if the tenant allows it as a callback; CallbackNotAllowed otherwise."""
        if len(url) > MAX_URL_CHARS or "\0" in url:
            raise CallbackNotAllowed(field, f"a URL of at most {MAX_URL_CHARS} characters")
        if not self.callback_urls:
            raise CallbackNotAllowed(
                field, "the tenant allows no callback URL (its webhooks.callback_urls is empty)"
            )
        if not any(url_allowed(url, allowed) for allowed in self.callback_urls):
            raise CallbackNotAllowed(
                field,
                f"{quote(url)} is not among the tenant's callback URLs "
                f"({', '.join(self.callback_urls)})",
            )
        return url

    def secret_for(self, target: str) -> Secret | None:
        """The secret that signs what goes to `target` (an endpoint's name or CALLBACK)."""
        endpoint = self.endpoint(target)
        if endpoint is not None:
            return endpoint.secret
        return self.secret

    def still_allows(self, target: str, url: str) -> bool:
        """Whether a delivery to `url` for `target` is still allowed by this policy (a
        reload may have removed the endpoint or the callback URL meanwhile)."""
        if target == CALLBACK:
            return self.secret is not None and any(
                url_allowed(url, allowed) for allowed in self.callback_urls
            )
        endpoint = self.endpoint(target)
        return endpoint is not None and endpoint.url == url


def url_allowed(url: str, allowed: str) -> bool:
    """Whether `url` is `allowed`, or lies below it when it ends in "/": the same scheme,
    host and port, and a path that starts with its path. No user info, no fragment."""
    try:
        candidate, base = URL(url), URL(allowed)
    except (ValueError, TypeError):
        return False
    if (
        candidate.scheme not in ("http", "https")
        or not candidate.host
        or candidate.user is not None
        or candidate.password is not None
        or candidate.fragment
        or ".." in url
        or "%2e" in url.lower()  # an encoded dot: no way around the path's prefix
    ):
        return False
    if (candidate.scheme, candidate.host, candidate.port) != (base.scheme, base.host, base.port):
        return False
    if allowed.endswith("/"):
        return candidate.raw_path.startswith(base.raw_path)
    return candidate.raw_path == base.raw_path and candidate.raw_query_string in (
        "",
        base.raw_query_string,
    )


# -- parsing the tenants file's table -------------------------------------------------------

_KEYS = {
    "endpoints",
    "callback_urls",
    "secret_env",
    "secret_file",
    "retry_s",
    "first_retry_s",
    "max_retry_delay_s",
    "max_concurrent",
    "budget_threshold",
}
_ENDPOINT_KEYS = {"url", "events", "secret_env", "secret_file"}


def _url(value: Any, setting: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_URL_CHARS:
        raise ConfigError(setting, f"must be an http(s) URL, not {value!r}")
    url = value.strip()
    try:
        parsed = URL(url)
    except ValueError:
        raise ConfigError(setting, f"{url!r} is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(setting, f"{url!r} is not an http(s) URL with a host")
    if parsed.user is not None or parsed.password is not None:
        raise ConfigError(setting, "must not carry a user name or password (sign with a secret)")
    if parsed.fragment:
        raise ConfigError(setting, "must not have a #fragment")
    return url


def _number(value: Any, setting: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > low:
        raise ConfigError(setting, f"must be a number above {low:g}, not {value!r}")
    if value == float("inf"):
        raise ConfigError(setting, "must be finite")
    return float(value)


def _secret(raw: Mapping[str, Any], setting: str, *, required: bool) -> Secret | None:
    env, file = raw.get("secret_env"), raw.get("secret_file")
    if env is not None and file is not None:
        raise ConfigError(f"{setting}.secret_file", "set it or secret_env, not both")
    if env is None and file is None:
        if required:
            raise ConfigError(
                f"{setting}.secret_env",
                "a signing secret is needed: secret_env (a variable's name) or secret_file",
            )
        return None
    if env is not None:
        if not isinstance(env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
            raise ConfigError(f"{setting}.secret_env", f"must be a variable's name, not {env!r}")
        secret = Secret(env=env)
        key = f"{setting}.secret_env"
    else:
        if not isinstance(file, str) or not file.strip():
            raise ConfigError(f"{setting}.secret_file", f"must be a file's path, not {file!r}")
        secret = Secret(file=Path(file).resolve())
        key = f"{setting}.secret_file"
    try:
        secret.read()  # here, so that a missing secret is a start-up error, not a failed send
    except SecretUnavailable as exc:
        raise ConfigError(key, str(exc)) from None
    return secret


def parse_webhooks(raw: Any, setting: str) -> WebhookPolicy:
    """The `webhooks` table of one tenant (`setting` names it in errors)."""
    if raw is None:
        return WebhookPolicy()
    if not isinstance(raw, dict):
        raise ConfigError(setting, "must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{setting}.{min(unknown)}", "unknown setting")
    default_secret = _secret(raw, setting, required=False)
    endpoints_raw = raw.get("endpoints", {})
    if not isinstance(endpoints_raw, dict):
        raise ConfigError(f"{setting}.endpoints", "must be a table of named endpoints")
    endpoints = []
    for name, entry in endpoints_raw.items():
        where = f"{setting}.endpoints.{name}"
        if not _NAME.match(name):
            raise ConfigError(where, "endpoint names are 1-63 chars of [a-z0-9_-]")
        if name == CALLBACK:
            raise ConfigError(where, f"{CALLBACK!r} names a request's callback URL: pick another")
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table (url, events, secret_env or secret_file)")
        unknown = set(entry) - _ENDPOINT_KEYS
        if unknown:
            raise ConfigError(f"{where}.{min(unknown)}", "unknown setting")
        events = entry.get("events", list(EVENTS))
        if (
            not isinstance(events, list)
            or not events
            or not all(isinstance(e, str) and e in EVENTS for e in events)
        ):
            raise ConfigError(f"{where}.events", f"must be a list of {', '.join(EVENTS)}")
        secret = _secret(entry, where, required=default_secret is None) or default_secret
        assert secret is not None
        endpoints.append(
            Endpoint(
                name, _url(entry.get("url"), f"{where}.url"), tuple(dict.fromkeys(events)), secret
            )
        )
    callbacks = raw.get("callback_urls", [])
    if not isinstance(callbacks, list):
        raise ConfigError(f"{setting}.callback_urls", "must be a list of http(s) URLs")
    callback_urls = tuple(_url(u, f"{setting}.callback_urls") for u in callbacks)
    if callback_urls and default_secret is None:
        raise ConfigError(
            f"{setting}.secret_env",
            "callback_urls need the table's own signing secret: secret_env or secret_file",
        )
    threshold = raw.get("budget_threshold")
    if threshold is not None:
        threshold = _number(threshold, f"{setting}.budget_threshold")
        if threshold > 1:
            raise ConfigError(
                f"{setting}.budget_threshold", "is a share of the daily limit: above 0, at most 1"
            )
    defaults = WebhookPolicy()
    policy = WebhookPolicy(
        endpoints=tuple(endpoints),
        callback_urls=callback_urls,
        secret=default_secret,
        retry_s=_number(raw.get("retry_s", defaults.retry_s), f"{setting}.retry_s"),
        first_retry_s=_number(
            raw.get("first_retry_s", defaults.first_retry_s), f"{setting}.first_retry_s"
        ),
        max_retry_delay_s=_number(
            raw.get("max_retry_delay_s", defaults.max_retry_delay_s),
            f"{setting}.max_retry_delay_s",
        ),
        max_concurrent=_positive(raw.get("max_concurrent", defaults.max_concurrent), setting),
        budget_threshold=threshold,
    )
    if policy.first_retry_s > policy.max_retry_delay_s:
        raise ConfigError(f"{setting}.first_retry_s", "is above max_retry_delay_s")
    if threshold is not None and not policy.wanting(BUDGET_THRESHOLD):
        raise ConfigError(
            f"{setting}.budget_threshold", f"no endpoint wants {BUDGET_THRESHOLD} events"
        )
    return policy


def _positive(value: Any, setting: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
        raise ConfigError(
            f"{setting}.max_concurrent", f"must be an integer in 1..64, not {value!r}"
        )
    return value
