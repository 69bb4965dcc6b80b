"""Which server(s) a client talks to, and how: the target and grpc's service config.

Given several replicas (a list of addresses, a comma-separated target, or a ``dns:`` name),
the client balances calls over them with ``round_robin`` and checks each replica's health
(grpc.health.v1 ``Watch`` of ``readiness``), so a replica that drains on SIGTERM, is still
starting or has lost its database gets no new calls. RunSession goes over a second channel
that checks ``agentplane.admission`` instead, which is NOT_SERVING also while a replica is
full, so new sessions go to replicas with room. Every client, one address or several,
retries UNAVAILABLE. All of it is grpc's own service config (:func:`service_config`); other
languages use the same JSON (docs/operations.md, "Clients of several replicas").
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from typing import Any, TypeAlias

Target: TypeAlias = str | Sequence[str]

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "AGENTPLANE_TARGET"
ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]

# The health name a replica reports SERVING on only while it takes new sessions: NOT_SERVING
# while starting, while its database is unreachable and from the first moment of a drain
# (server/health.py READY_NAMES; "" and agentplane.v1.SessionService follow it). Kubernetes'
# readinessProbe and Envoy check the same name.
HEALTH_SERVICE = "readiness"
# The health name RunSession is balanced on (a channel of its own when balanced): as
# `readiness`, and NOT_SERVING too while the replica is full (AGENTPLANE_MAX_SESSIONS
# agents), so new sessions go to replicas with room while reads, cancels and answers still
# reach a full replica (server/health.py ADMISSION).
ADMISSION_HEALTH_SERVICE = "agentplane.admission"

# Schemes grpc resolves itself; a target without one is "host:port" (or a list of them).
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")

# Retrying UNAVAILABLE is safe for every method of these services. gRPC retries only before
# the call is committed, i.e. before any response header or message arrived; after that the
# caller gets the error. What an uncommitted UNAVAILABLE means, per method:
# - RunSession (server streaming, not idempotent without a request_id): a replica that is
#   draining, not ready, full (REPLICA_FULL: another replica may have room; a tenant's own
#   limit is RESOURCE_EXHAUSTED, not retried) or cut off from its database refuses *before
#   admission* (nothing
#   was created, no budget held) with a trailers-only UNAVAILABLE, so a retry on the next
#   replica is what the caller wants. Once admitted, the `started` event is the first
#   message, which commits the call: a later failure is never retried (re-attach with
#   StreamSession or a repeated request_id instead). The one ambiguous case is a
#   connection lost between the admission commit and `started` reaching the caller: the
#   retry starts a second session, and the server cancels the first as a disconnect
#   (on_disconnect CANCEL, the default); with a request_id the retry re-attaches to it.
# - StreamSession, GetSession, ListSessions, GetBudget, GetUsage, Health/Check: reads.
# - CancelSession: idempotent in effect (the session ends cancelled either way); a retry
#   after a lost reply answers FAILED_PRECONDITION (already ended).
_RETRIED = [
    {"service": "agentplane.v1.SessionService"},
    {"service": "agentplane.v1.BudgetService"},
    {"service": "agentplane.v1.UsageService"},
    {"service": "grpc.health.v1.Health", "method": "Check"},
]
# 5 attempts (grpc's cap) with backoff 0.1, 0.2, 0.4, 0.8 s (each jittered down): at most
# ~1.5 s more when no replica can take the call; one retry usually finds a ready one.
_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Each failed attempt costs a token and each success returns one; retries pause below half
# of them (here: while failures outnumber successes by 50), so a fleet-wide outage is not
# multiplied by the retries, while a drain's few refusals always are retried.
_RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 1}


def service_config(*, balanced: bool = True, admission: bool = False) -> dict[str, Any]:
    """grpc's service config for agentplane, as a JSON-ready dict (a new one each call).

    ``balanced``: health-checked ``round_robin`` over every address of the target (for
    several replicas) plus the retry policy; otherwise the retry policy alone.
    ``admission``: the health name is ``agentplane.admission`` (for the channel that
    carries RunSession: replicas without room are skipped) instead of ``readiness`` (for
    every other call). Pass ``json.dumps(service_config())`` as the
    ``grpc.service_config`` channel option.
    """
    config: dict[str, Any] = {}
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        name = ADMISSION_HEALTH_SERVICE if admission else HEALTH_SERVICE
        config["healthCheckConfig"] = {"serviceName": name}
    config["methodConfig"] = [
        {"name": [dict(n) for n in _RETRIED], "retryPolicy": dict(_RETRY_POLICY)}
    ]
    config["retryThrottling"] = dict(_RETRY_THROTTLING)
    return config


def resolve_target(target: str | None) -> str:
    """The target argument, else ``$AGENTPLANE_TARGET``, else 127.0.0.1:50051."""
    return target or os.environ.get(TARGET_ENV, "").strip() or DEFAULT_TARGET


def resolve(target: Target | None) -> tuple[str, bool]:
    """The grpc target string for ``target`` and whether it names several replicas.

    ``target``: a grpc target (``"host:port"``, ``"dns:///name:port"``, ``"ipv4:a:p,b:p"``,
    ...), several ``host:port`` addresses (a sequence, or one string joined with commas),
    or None for ``$AGENTPLANE_TARGET`` (which may be such a list) or 127.0.0.1:50051.
    Several addresses must be IP addresses of one family (grpc's ``ipv4:``/``ipv6:``
    targets); a name that resolves to every replica is a ``dns:`` target. ValueError for
    anything else, naming the bad address.
    """
    if target is None or isinstance(target, str):
        text = resolve_target(target).strip()
        if text.startswith(_SCHEMES):
            scheme, _, rest = text.partition(":")
            return text, scheme == "dns" or (scheme in ("ipv4", "ipv6") and "," in rest)
        if "," not in text:
            return text, False  # one address: grpc's default (pick_first), as before
        addresses: Sequence[str] = text.split(",")
    else:
        addresses = list(target)
        if not all(isinstance(a, str) for a in addresses):
            raise ValueError(f"target addresses must be strings: {addresses!r}")
    return _address_list(addresses)


def _address_list(addresses: Sequence[str]) -> tuple[str, bool]:
    """One address as itself; several as an ``ipv4:``/``ipv6:`` multi-address target."""
    if not addresses:
        raise ValueError("no target address given")
    parsed = [_host_port(a) for a in addresses]
    if len(parsed) == 1:
        return addresses[0].strip(), False
    families = set()
    for address, (host, _) in zip(addresses, parsed, strict=True):
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{address.strip()!r}: several addresses must be IP addresses; for a DNS "
                f"name that resolves to every replica, use one target 'dns:///{host}:PORT'"
            ) from None
    if len(families) > 1:
        raise ValueError(f"mixes IPv4 and IPv6 addresses (grpc cannot): {list(addresses)!r}")
    if len(set(parsed)) < len(parsed):
        raise ValueError(f"an address is given twice: {list(addresses)!r}")
    if families == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in parsed), True
    return "ipv4:" + ",".join(f"{h}:{p}" for h, p in parsed), True


def _host_port(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError saying what is wrong."""
    text = address.strip()
    if not text:
        raise ValueError("an empty address in the target list")
    if text.startswith(_SCHEMES) or "/" in text:
        raise ValueError(f"{text!r}: a list holds host:port addresses, not grpc targets")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, '[{host}]:{port}'")
    if not host or not port:
        raise ValueError(f"{text!r}: expected host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def channel_options(
    balanced: bool, options: ChannelOptions | None, *, admission: bool = False
) -> list[tuple[str, Any]]:
    """The caller's channel options, plus retries and agentplane's service config unless the
    caller set those options themselves (`admission`: see `service_config`)."""
    given = list(options or ())
    names = {name for name, _ in given}
    config = service_config(balanced=balanced, admission=admission)
    ours: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
    ]
    return given + [(name, value) for name, value in ours if name not in names]
