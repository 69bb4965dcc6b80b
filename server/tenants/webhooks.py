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
from ..toml_schema import Key, Rule, Table

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


# -- the tenants file's table, declared -----------------------------------------------------


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_URL_CHARS:
        raise ValueError(f"must be an http(s) URL, not {value!r}")
    url = value.strip()
    try:
        parsed = URL(url)
    except ValueError:
        raise ValueError(f"{url!r} is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    if parsed.user is not None or parsed.password is not None:
        raise ValueError("must not carry a user name or password (sign with a secret)")
    if parsed.fragment:
        raise ValueError("must not have a #fragment")
    return url


def _urls(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of http(s) URLs")  # noqa: TRY004 (a parser's reason)
    return tuple(_url(u) for u in value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"must be a number above 0, not {value!r}")
    if value == float("inf"):
        raise ValueError("must be finite")
    return float(value)


def _share(value: Any) -> float | None:
    if value is None:
        return None
    if _number(value) > 1:
        raise ValueError("is a share of the daily limit: above 0, at most 1")
    return float(value)


def _concurrency(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
        raise ValueError(f"must be an integer in 1..64, not {value!r}")
    return value


def _events(value: Any) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(e, str) and e in EVENTS for e in value)
    ):
        raise ValueError(f"must be a list of {', '.join(EVENTS)}")
    return tuple(dict.fromkeys(value))


def _readable(secret: Secret) -> Secret:
    try:
        secret.read()  # here, so that a missing secret is a start-up error, not a failed send
    except SecretUnavailable as exc:
        raise ValueError(str(exc)) from None
    return secret


def _secret_env(value: Any) -> Secret | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"must be a variable's name, not {value!r}")
    return _readable(Secret(env=value))


def _secret_file(value: Any) -> Secret | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a file's path, not {value!r}")
    return _readable(Secret(file=Path(value).resolve()))


def _secret(values: Mapping[str, Any]) -> Secret | None:
    """The secret a table's secret_env or secret_file names (None: neither)."""
    return values["secret_env"] or values["secret_file"]


def _one_secret(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    both = raw.get("secret_env") is not None and raw.get("secret_file") is not None
    return "set it or secret_env, not both" if both else None


def _needs_secret(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    if raw.get("secret_env") is None and raw.get("secret_file") is None:
        return "a signing secret is needed: secret_env (a variable's name) or secret_file"
    return None


def _callbacks_signed(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    if values["callback_urls"] and _secret(values) is None:
        return "callback_urls need the table's own signing secret: secret_env or secret_file"
    return None


def _retry_delays(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    above = values["first_retry_s"] > values["max_retry_delay_s"]
    return "is above max_retry_delay_s" if above else None


def _threshold_wanted(values: Mapping[str, Any], raw: Mapping[str, Any]) -> str | None:
    wanted = any(BUDGET_THRESHOLD in e.events for e in values["endpoints"])
    if values["budget_threshold"] is not None and not wanted:
        return f"no endpoint wants {BUDGET_THRESHOLD} events"
    return None


def _secret_keys(meaning: str, shown: str) -> tuple[Key, ...]:
    return (
        Key("secret_env", _secret_env, None, meaning, shown=shown),
        Key("secret_file", _secret_file, None, "or: a file holding it", shown=shown),
    )


def _endpoint(signed_by_table: bool) -> Table:
    """An endpoint's keys; without the table's own secret, it needs one of its own."""
    needs = () if signed_by_table else (Rule("secret_env", _needs_secret),)
    return Table(
        (
            Key("events", _events, list(EVENTS), "the events it is sent"),
            Rule("secret_file", _one_secret),
            *needs,
            *_secret_keys("the variable holding the endpoint's own signing secret", "the table's"),
            Key("url", _url, None, "where they are sent (http or https)", shown="required"),
        )
    )


ENDPOINT = _endpoint(signed_by_table=True)
_SIGNED_ENDPOINT = _endpoint(signed_by_table=False)


def _endpoints(value: Any, setting: str, values: Mapping[str, Any]) -> tuple[Endpoint, ...]:
    if not isinstance(value, dict):
        raise ConfigError(setting, "must be a table of named endpoints")
    default_secret = _secret(values)
    table = ENDPOINT if default_secret is not None else _SIGNED_ENDPOINT
    endpoints = []
    for name, entry in value.items():
        where = f"{setting}.{name}"
        if not _NAME.match(name):
            raise ConfigError(where, "endpoint names are 1-63 chars of [a-z0-9_-]")
        if name == CALLBACK:
            raise ConfigError(where, f"{CALLBACK!r} names a request's callback URL: pick another")
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table (url, events, secret_env or secret_file)")
        read = table.read(entry, where)
        secret = _secret(read) or default_secret
        assert secret is not None
        endpoints.append(Endpoint(name, read["url"], read["events"], secret))
    return tuple(endpoints)


_DEFAULTS = WebhookPolicy()
# The keys of a tenant's [tenants.<name>.webhooks] table, in the order they are checked.
WEBHOOKS = Table(
    (
        Rule("secret_file", _one_secret),
        *_secret_keys(
            "the variable holding the table's signing secret (`whsec_<base64>`): it signs "
            "callbacks, and endpoints without a secret of their own",
            "unset",
        ),
        Key(
            "endpoints",
            _endpoints,
            {},
            "named receivers, each a table `[tenants.<tenant>.webhooks.endpoints.<name>]` "
            "(its keys below)",
            nested=True,
            shown="none",
        ),
        Key(
            "callback_urls",
            _urls,
            [],
            "URLs a request's `callback_url` may name (exactly, or below one ending in `/`)",
        ),
        Rule("secret_env", _callbacks_signed),
        Key(
            "budget_threshold",
            _share,
            None,
            "`budget.threshold` is sent once a day when the day's spend reaches this share of "
            "`daily_limit_usd` (above 0, at most 1)",
            shown="unset (never)",
        ),
        Key(
            "retry_s",
            _number,
            _DEFAULTS.retry_s,
            "how long a delivery is retried after its event",
        ),
        Key(
            "first_retry_s",
            _number,
            _DEFAULTS.first_retry_s,
            "the first retry's delay; it doubles per retry, times a random factor in [0.5, 1]",
        ),
        Key(
            "max_retry_delay_s",
            _number,
            _DEFAULTS.max_retry_delay_s,
            "the longest delay between retries",
        ),
        Key(
            "max_concurrent",
            _concurrency,
            _DEFAULTS.max_concurrent,
            "deliveries in flight at once, per replica (1-64)",
        ),
        Rule("first_retry_s", _retry_delays),
        Rule("budget_threshold", _threshold_wanted),
    )
)


def parse_webhooks(raw: Any, setting: str) -> WebhookPolicy:
    """The `webhooks` table of one tenant (`setting` names it in errors)."""
    if raw is None:
        return WebhookPolicy()
    if not isinstance(raw, dict):
        raise ConfigError(setting, "must be a table")
    read = WEBHOOKS.read(raw, setting)
    return WebhookPolicy(
        endpoints=read["endpoints"],
        callback_urls=read["callback_urls"],
        secret=_secret(read),
        retry_s=read["retry_s"],
        first_retry_s=read["first_retry_s"],
        max_retry_delay_s=read["max_retry_delay_s"],
        max_concurrent=read["max_concurrent"],
        budget_threshold=read["budget_threshold"],
    )


def webhook_keys_table() -> str:
    """The docs' table of a `webhooks` table's keys and its endpoints' (docs/webhooks.md; a
    test keeps it in step)."""
    endpoint_rows = ENDPOINT.reference("endpoints.<name>.").splitlines()[2:]
    return WEBHOOKS.reference("") + "".join(row + "\n" for row in endpoint_rows)
