"""A tenant's `webhooks` table: what the tenants file may say, what it refuses (one line
naming the setting, never a secret), and which callback URLs a request may name."""

from __future__ import annotations

import base64
import random
from pathlib import Path

import pytest
from agentplane.server.errors import ConfigError
from agentplane.server.tenants import TenantRegistry, hash_token
from agentplane.server.tenants.webhooks import (
    CallbackNotAllowed,
    Secret,
    SecretUnavailable,
    WebhookPolicy,
    url_allowed,
)
from agentplane.server.webhooks.sender import retry_delay
from webhook_receiver import new_secret

ENV = "AGENTPLANE_TEST_HOOK_CONFIG_SECRET"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = new_secret()
    monkeypatch.setenv(ENV, value)
    return value


def tenants_file(tmp_path: Path, webhooks: str) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(
        f"""
[tenants.acme]
token_sha256 = ["{hash_token("t")}"]

[tenants.acme.webhooks]
{webhooks}
"""
    )
    return path


def test_a_full_table_is_read(tmp_path: Path, secret: str) -> None:
    path = tenants_file(
        tmp_path,
        f"""secret_env = "{ENV}"
callback_urls = ["https://app.example/hooks/"]
retry_s = 600
first_retry_s = 1
max_retry_delay_s = 60
max_concurrent = 2
budget_threshold = 0.75

[tenants.acme.webhooks.endpoints.billing]
url = "https://hooks.example/agentplane"
events = ["budget.threshold", "session.ended"]
""",
    )
    registry = TenantRegistry.load(path)
    policy = registry.tenants["acme"].webhooks
    (endpoint,) = policy.endpoints
    assert (endpoint.name, endpoint.url, endpoint.events) == (
        "billing",
        "https://hooks.example/agentplane",
        ("budget.threshold", "session.ended"),
    )
    assert endpoint.secret == Secret(env=ENV) and endpoint.secret.read() == secret
    assert (policy.retry_s, policy.first_retry_s, policy.max_retry_delay_s) == (600, 1, 60)
    assert (policy.max_concurrent, policy.budget_threshold) == (2, 0.75)
    assert policy.wanting("session.waiting") == ()
    # The secret's variable is scrubbed from unsandboxed agents like an API key.
    assert ENV in registry.key_env_names()
    # Without a table: nothing is sent, no callback is allowed.
    assert not WebhookPolicy().enabled


def test_a_secret_file_is_read_when_signing(tmp_path: Path) -> None:
    key_file = tmp_path / "hook.key"
    key_file.write_text(new_secret() + "\n")
    path = tenants_file(
        tmp_path,
        f"""[tenants.acme.webhooks.endpoints.main]
url = "http://127.0.0.1:9/x"
secret_file = "{key_file}"
""",
    )
    endpoint = TenantRegistry.load(path).tenants["acme"].webhooks.endpoints[0]
    rotated = new_secret()
    key_file.write_text(rotated)
    assert endpoint.secret.read() == rotated  # read per attempt: rotation needs no restart
    key_file.unlink()
    with pytest.raises(SecretUnavailable, match="cannot read"):
        endpoint.secret.read()


SHORT = "whsec_" + base64.b64encode(b"x" * 8).decode()


@pytest.mark.parametrize(
    ("table", "value", "setting", "words"),
    [
        ('colour = "red"', None, "webhooks.colour", "unknown setting"),
        (
            '[tenants.acme.webhooks.endpoints.a]\nurl = "http://h/x"',
            None,
            "endpoints.a.secret_env",
            "a signing secret is needed",
        ),
        (
            f'secret_env = "{ENV}"\n[tenants.acme.webhooks.endpoints.a]\nurl = "ftp://h/x"',
            None,
            "endpoints.a.url",
            "http(s)",
        ),
        (
            f'secret_env = "{ENV}"\n[tenants.acme.webhooks.endpoints.a]\nurl = "https://u:p@h/x"',
            None,
            "endpoints.a.url",
            "user name or password",
        ),
        (
            (
                f'secret_env = "{ENV}"\n[tenants.acme.webhooks.endpoints.a]\n'
                'url = "https://h/x"\nevents = ["session.exploded"]'
            ),
            None,
            "endpoints.a.events",
            "session.ended",
        ),
        (
            f'secret_env = "{ENV}"\n[tenants.acme.webhooks.endpoints.callback]\nurl = "https://h/x"',
            None,
            "endpoints.callback",
            "pick another",
        ),
        (
            f'secret_env = "{ENV}"\nbudget_threshold = 0.5',
            None,
            "budget_threshold",
            "no endpoint wants budget.threshold",
        ),
        (f'secret_env = "{ENV}"\nbudget_threshold = 1.5', None, "budget_threshold", "at most 1"),
        (f'secret_env = "{ENV}"\nretry_s = 0', None, "retry_s", "above 0"),
        (f'secret_env = "{ENV}"\nmax_concurrent = 0', None, "max_concurrent", "1..64"),
        (
            (
                'callback_urls = ["https://h/"]\n[tenants.acme.webhooks.endpoints.a]\n'
                f'url = "https://h/x"\nsecret_env = "{ENV}"'
            ),
            None,
            "webhooks.secret_env",
            "callback_urls need the table's own signing secret",
        ),
        ('secret_env = "NO_SUCH_HOOK_SECRET_VAR"', None, "secret_env", "unset or empty"),
        (f'secret_env = "{ENV}"', "not base64 at all!", "secret_env", "not base64"),
        (f'secret_env = "{ENV}"', SHORT, "secret_env", "8 bytes"),
    ],
)
def test_a_bad_table_is_one_line_naming_the_setting(
    tmp_path: Path,
    secret: str,
    monkeypatch: pytest.MonkeyPatch,
    table: str,
    value: str | None,
    setting: str,
    words: str,
) -> None:
    if value is not None:
        monkeypatch.setenv(ENV, value)
    with pytest.raises(ConfigError) as caught:
        TenantRegistry.load(tenants_file(tmp_path, table))
    message = str(caught.value)
    assert setting in message and words in message
    assert "\n" not in message
    # Never the secret itself, good or bad.
    assert secret.removeprefix("whsec_") not in message
    if value is not None:
        assert value.removeprefix("whsec_") not in message


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("https://a.example/hooks/1", "https://a.example/hooks/", True),
        ("https://a.example/hooks/a/b?x=1", "https://a.example/hooks/", True),
        ("https://a.example/hooks", "https://a.example/hooks", True),
        ("https://a.example/hooks?x=1", "https://a.example/hooks", False),
        ("https://a.example/hooksx", "https://a.example/hooks", False),
        ("https://a.example/hooks2/1", "https://a.example/hooks/", False),
        ("https://a.example.evil.example/hooks/1", "https://a.example/hooks/", False),
        ("https://a.example:444/hooks/1", "https://a.example/hooks/", False),
        ("http://a.example/hooks/1", "https://a.example/hooks/", False),
        ("https://a.example/hooks/../admin", "https://a.example/hooks/", False),
        ("https://a.example/hooks/%2E%2E/admin", "https://a.example/hooks/", False),
        ("https://me@a.example/hooks/1", "https://a.example/hooks/", False),
        ("https://a.example/hooks/1#frag", "https://a.example/hooks/", False),
        ("file:///etc/passwd", "https://a.example/hooks/", False),
        ("", "https://a.example/hooks/", False),
    ],
)
def test_callback_urls_are_matched_exactly_or_below_a_folder(
    url: str, allowed: str, ok: bool
) -> None:
    assert url_allowed(url, allowed) is ok


def test_a_callback_outside_the_list_is_refused_naming_the_field() -> None:
    policy = WebhookPolicy(callback_urls=("https://a.example/hooks/",), secret=Secret(env=ENV))
    assert policy.check_callback("https://a.example/hooks/7") == "https://a.example/hooks/7"
    with pytest.raises(CallbackNotAllowed) as caught:
        policy.check_callback("https://b.example/")
    assert caught.value.field == "callback_url"
    assert caught.value.reason == "CALLBACK_URL_NOT_ALLOWED"
    with pytest.raises(CallbackNotAllowed, match="allows no callback URL"):
        WebhookPolicy().check_callback("https://a.example/hooks/7")


def test_retries_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    policy = WebhookPolicy(first_retry_s=1.0, max_retry_delay_s=30.0)
    rng = random.Random(7)
    delays = [retry_delay(policy, n, rng.random) for n in range(1, 9)]
    bases = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(base / 2 <= d <= base for d, base in zip(delays, bases, strict=True))
    assert retry_delay(policy, 3, lambda: 0.0) == 2.0 and retry_delay(policy, 3, lambda: 1.0) == 4.0
