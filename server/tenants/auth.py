"""Who a call is: the tenant of a bearer token (by its SHA-256) or of a client certificate.

A `Directory` indexes one tenants file's credentials (each token hash, certificate name and
subject belongs to one tenant); `authenticate` checks a call against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..certs import CertIdentity
from ..errors import ConfigError, Unauthenticated
from .policy import DEFAULT_TENANT, Tenant


def hash_token(token: str) -> str:
    """The hex SHA-256 of a caller token, as the tenants file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Directory:
    """One tenants file, indexed: replaced whole, never changed in place."""

    tenants: Mapping[str, Tenant]
    by_hash: Mapping[str, Tenant]
    by_san: Mapping[str, Tenant]
    by_subject: Mapping[str, Tenant]
    dev_mode: bool

    @classmethod
    def of(cls, tenants: Iterable[Tenant], dev_mode: bool) -> Directory:
        """The index of `tenants`; ConfigError when two list the same credential."""
        tenants = list(tenants)
        by_hash: dict[str, Tenant] = {}
        by_san: dict[str, Tenant] = {}
        by_subject: dict[str, Tenant] = {}
        for tenant in tenants:
            for index, keys, what in (
                (by_hash, tenant.token_sha256, "token_sha256"),
                (by_san, tenant.client_cert_sans, "client_cert_sans"),
                (by_subject, tenant.client_cert_subjects, "client_cert_subjects"),
            ):
                for k in keys:
                    if k in index:
                        entry = "a token hash" if what == "token_sha256" else repr(k)
                        raise ConfigError(
                            f"tenants.{tenant.name}.{what}",
                            f"{entry} is also listed for tenant {index[k].name}",
                        )
                    index[k] = tenant
        return cls({t.name: t for t in tenants}, by_hash, by_san, by_subject, dev_mode)


def authenticate(
    directory: Directory, authorization: str | None, peer: CertIdentity | None
) -> Tenant:
    """The tenant of a call: by its client certificate (`peer`, verified by mTLS) if a
    tenant is bound to it, else by its `authorization: Bearer <token>` header value. A
    call that names two tenants (a certificate of one, a token of another) is refused: no
    certificate ever authenticates as another tenant."""
    if directory.dev_mode:
        return directory.tenants[DEFAULT_TENANT]
    by_cert = _certificate_tenant(directory, peer) if peer is not None else None
    if by_cert is not None and not authorization:
        return by_cert
    if not authorization:
        raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata must be `Bearer <token>`")
    tenant = directory.by_hash.get(hash_token(token.strip()))
    if tenant is None:
        raise Unauthenticated("unknown token")
    if by_cert is not None and by_cert.name != tenant.name:
        raise Unauthenticated("the client certificate and the token belong to different tenants")
    return tenant


def _certificate_tenant(directory: Directory, peer: CertIdentity) -> Tenant | None:
    """The tenant bound to a client certificate (None: bound to none); Unauthenticated
    when its names are bound to different tenants."""
    found = {
        t.name: t
        for t in (
            directory.by_subject.get(peer.subject),
            *(directory.by_san.get(san) for san in peer.sans),
        )
        if t is not None
    }
    if len(found) > 1:
        raise Unauthenticated("the client certificate names more than one tenant")
    return next(iter(found.values()), None)
