"""The configured tenants: a `TenantRegistry` is read whole and checked before use, and a
live one takes a newer file's contents in one step (`replace`), saying what changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..certs import CertIdentity
from ..errors import ConfigError
from ..mcp.servers import RemoteServer
from .auth import Directory, authenticate
from .policy import Tenant
from .schema import WHERE, dev_tenant, parse_file


@dataclass(frozen=True)
class TenantChanges:
    """What a reload changed: tenant names, and per changed tenant the names of the
    settings that differ (never their values: some are token hashes)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _differences(old: Tenant, new: Tenant) -> tuple[str, ...]:
    return tuple(f.name for f in fields(Tenant) if getattr(old, f.name) != getattr(new, f.name))


class TenantRegistry:
    """The configured tenants and the caller check (bearer token, client certificate).

    Services hold one registry for the server's life; a reload swaps its whole contents
    at once (`replace`), so a call sees either the old file or the new one, never a mix.
    """

    def __init__(self, tenants: list[Tenant], *, dev_mode: bool = False) -> None:
        self._current = Directory.of(tenants, dev_mode)

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        return self._current.tenants

    @property
    def dev_mode(self) -> bool:
        return self._current.dev_mode

    @property
    def binds_certificates(self) -> bool:
        """Whether any tenant is bound to client certificates."""
        return bool(self._current.by_san or self._current.by_subject)

    @classmethod
    def dev(cls) -> TenantRegistry:
        return cls([dev_tenant()], dev_mode=True)

    @classmethod
    def load(cls, path: Path) -> TenantRegistry:
        """Read and check the whole file; raises ConfigError naming what is wrong."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(WHERE, f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(WHERE, f"{path} is not UTF-8 text") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path) -> TenantRegistry:
        """The tenants of `text`, the contents of the tenants file `path`."""
        return cls(parse_file(text, path))

    def replace(self, other: TenantRegistry) -> TenantChanges:
        """Take `other`'s tenants, all at once; what changed."""
        old, new = self._current.tenants, other._current.tenants
        changes = TenantChanges(
            added=tuple(sorted(set(new) - set(old))),
            removed=tuple(sorted(set(old) - set(new))),
            changed={
                name: diff
                for name in sorted(set(old) & set(new))
                if (diff := _differences(old[name], new[name]))
            },
        )
        self._current = other._current
        return changes

    def current(self, tenant: Tenant) -> bool:
        """Whether `tenant` is still configured (a reload may have removed it)."""
        return tenant.name in self._current.tenants

    def authenticate(self, authorization: str | None, peer: CertIdentity | None = None) -> Tenant:
        """The tenant of a call (see `auth.authenticate`), checked against one file for
        the whole check, even across a reload."""
        return authenticate(self._current, authorization, peer)

    def key_env_names(self) -> set[str]:
        """Every variable of the server's that holds a tenant's secret: API keys, MCP
        servers' headers and variables, webhook signing secrets (scrubbed from unsandboxed
        agents' environment)."""
        names = {t.anthropic_api_key_env for t in self.tenants.values()}
        for tenant in self.tenants.values():
            hooks = tenant.webhooks
            secrets = [hooks.secret, *(e.secret for e in hooks.endpoints)]
            names.update(s.env for s in secrets if s is not None and s.env)
            for server in tenant.mcp_servers:
                pairs = server.headers if isinstance(server, RemoteServer) else server.env
                names.update(value.env for _, value in pairs if value.env)
        return names
