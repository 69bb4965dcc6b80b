"""The caller's tenant, from `authorization: Bearer <token>` metadata."""

from __future__ import annotations

import grpc

from ..tenants import Tenant, TenantRegistry


def caller(tenants: TenantRegistry, context: grpc.aio.ServicerContext) -> Tenant:
    """Authenticate the call; raises Unauthenticated (the token never appears in errors)."""
    authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            authorization = value if isinstance(value, str) else value.decode()
            break
    return tenants.authenticate(authorization)
