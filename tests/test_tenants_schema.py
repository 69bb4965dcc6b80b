"""The tenants file's keys are declared once (server/tenants/schema.py): the docs' keys table
is generated from the declarations, and each key's default is a value its own parser takes,
giving the policy the server documents."""

from __future__ import annotations

from decimal import Decimal

from agentplane.server.sandbox.limits import SessionLimits
from agentplane.server.tenants import (
    TENANT,
    EventLimits,
    FileLimits,
    dev_tenant,
    tenant_keys_table,
)
from agentplane.server.tenants.webhooks import ENDPOINT, WEBHOOKS, WebhookPolicy


def test_the_keys_table_lists_every_declared_key_once() -> None:
    header, rule, *rows = tenant_keys_table().splitlines()
    assert (header, rule) == ("| key | default | meaning |", "|---|---|---|")
    keys = [row.split("|")[1].strip().strip("`") for row in rows]
    assert keys == [key.name for key in TENANT.keys]
    assert len(set(keys)) == len(keys)
    # Three cells each, none empty: a '|' inside a meaning would break the table.
    assert all(row.count("|") == 4 and "||" not in row.replace(" ", "") for row in rows)


def test_the_defaults_are_values_their_keys_take() -> None:
    """Dev mode's tenant is every key at its default, each through its parser."""
    tenant = dev_tenant()
    assert tenant.limits == SessionLimits()
    assert tenant.files == FileLimits()
    assert tenant.events == EventLimits()
    assert tenant.webhooks == WebhookPolicy()
    assert (tenant.daily_limit_usd, tenant.max_session_budget_usd) == (Decimal(10), Decimal(1))
    assert tenant.allowed_tools == ("Read", "Glob", "Grep")
    assert (tenant.time_zone, tenant.max_duration_s, tenant.answer_timeout_s) == (
        "UTC",
        3600.0,
        300.0,
    )
    assert not (tenant.token_sha256 or tenant.client_cert_sans or tenant.client_cert_subjects)


def test_the_webhooks_table_is_declared_the_same_way() -> None:
    header, _, *rows = WEBHOOKS.reference("webhooks.").splitlines()
    assert header == "| key | default | meaning |"
    assert [row.split("|")[1].strip().strip("`") for row in rows] == [
        f"webhooks.{key.name}" for key in WEBHOOKS.keys
    ]
    assert {key.name for key in ENDPOINT.keys} == {"url", "events", "secret_env", "secret_file"}
