"""The caller's tenant, from `authorization: Bearer <token>` metadata or (mTLS) the
client certificate grpc verified."""

from __future__ import annotations

import grpc

from ..certs import CertIdentity, peer_identity
from ..tenants import Tenant, TenantRegistry


def caller(tenants: TenantRegistry, context: grpc.aio.ServicerContext) -> Tenant:
    """Authenticate the call; raises Unauthenticated (the token never appears in errors)."""
    authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            authorization = value if isinstance(value, str) else value.decode()
            break
    # Only where a tenant is bound to certificates: the others pay nothing for mTLS.
    peer = _peer(context) if tenants.binds_certificates else None
    return tenants.authenticate(authorization, peer)


def _peer(context: grpc.aio.ServicerContext) -> CertIdentity | None:
    """The identity of the client certificate of the call's connection, if it has one
    (grpc gives the certificate only once the handshake verified it against the client
    CA)."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    return peer_identity(pem[0]) if pem else None
