"""Tenants: who may call, with which tools, prompt and limits.

The tenants file (TOML) holds only hashes of caller tokens, the identities of client
certificates (mTLS) and the *name* of the environment variable with each tenant's
Anthropic API key, never a secret itself. Its rooms: `policy` (the Tenant value), `schema`
(the file's keys, declared, and parsing), `auth` (who a call is), `registry` (the
configured tenants, replaced whole) and `reload` (following the file while serving).
"""

from .auth import hash_token
from .policy import (
    DEFAULT_TENANT,
    EFFORTS,
    MAX_INPUT_TOTAL_BYTES,
    MAX_SERVER_TOOL_USES,
    MIN_EVENTS,
    MIN_THINKING_TOKENS,
    EventLimits,
    FileLimits,
    Tenant,
)
from .registry import TenantChanges, TenantRegistry
from .schema import TENANT, dev_tenant, tenant_keys_table

__all__ = [
    "DEFAULT_TENANT",
    "EFFORTS",
    "MAX_INPUT_TOTAL_BYTES",
    "MAX_SERVER_TOOL_USES",
    "MIN_EVENTS",
    "MIN_THINKING_TOKENS",
    "TENANT",
    "EventLimits",
    "FileLimits",
    "Tenant",
    "TenantChanges",
    "TenantRegistry",
    "dev_tenant",
    "hash_token",
    "tenant_keys_table",
]
