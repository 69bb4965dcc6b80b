"""Domain errors. Only `api/` maps them to gRPC status codes.

Each error carries its `reason` (upper snake case): the ErrorInfo reason on the wire and
the `reason` label of the admission-rejection metric, so the two always agree.

    AgentplaneError                                       reason
    ├── InvalidArgument      a request field is wrong     INVALID_ARGUMENT
    │   └── UnknownModel     not in the price table       UNKNOWN_MODEL (money/pricing.py)
    ├── Unauthenticated      no or unknown caller token   UNAUTHENTICATED
    ├── NotFound             no such session (tenant)     NOT_FOUND
    ├── FailedPrecondition   not in the session's state   FAILED_PRECONDITION
    ├── QuotaExceeded        admission refused            BUDGET_EXCEEDED, CONCURRENCY_LIMIT
    ├── Unavailable          not ready, draining          UNAVAILABLE
    │   ├── DatabaseUnavailable  the database is out      DATABASE_UNAVAILABLE
    │   └── ReplicaFull      this replica runs its most   REPLICA_FULL (retried elsewhere)
    ├── Unimplemented        not in this release          UNIMPLEMENTED
    └── ConfigError          invalid configuration        CONFIG_ERROR (start-up, names the setting)
"""

from __future__ import annotations

# How much of a caller's input an error message repeats: a whole 1 MB id in the reply's
# trailers would exceed the client's metadata limit and hide the error itself.
QUOTED_CHARS = 100


def quote(value: str) -> str:
    """`value` for an error message: repr'd, and cut to QUOTED_CHARS characters."""
    if len(value) <= QUOTED_CHARS:
        return repr(value)
    return f"{value[:QUOTED_CHARS]!r}... ({len(value)} characters)"


class AgentplaneError(Exception):
    """The root of agentplane's own errors."""

    # Overridden by every subclass (and per instance where one class has several reasons).
    reason: str = "INTERNAL"


class InvalidArgument(AgentplaneError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class Unauthenticated(AgentplaneError):
    reason = "UNAUTHENTICATED"


class NotFound(AgentplaneError):
    reason = "NOT_FOUND"


class FailedPrecondition(AgentplaneError):
    """Not in the right state; `reason` may say which (ALREADY_ANSWERED, SESSION_ENDED)."""

    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, reason: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.reason = reason


class QuotaExceeded(AgentplaneError):
    """Admission refused; `reason` is BUDGET_EXCEEDED or CONCURRENCY_LIMIT."""

    def __init__(self, reason: str, subject: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.subject = subject


class Unavailable(AgentplaneError):
    reason = "UNAVAILABLE"


class DatabaseUnavailable(Unavailable):
    """The database cannot serve now (unreachable, its file gone, read-only, ...); raised
    by the store layer with the driver's error as `__cause__`. A retry later may succeed.
    The message is for the caller: it never holds a URL, a password or SQL."""

    reason = "DATABASE_UNAVAILABLE"

    def __init__(self, message: str = "the database is unreachable; retry later") -> None:
        super().__init__(message)


class ReplicaFull(Unavailable):
    """This replica runs its maximum of agents (AGENTPLANE_MAX_SESSIONS); another replica
    may have room. UNAVAILABLE, so the client's service config retries it on the next
    replica (a tenant's own limit is QuotaExceeded: no replica would take it). The caller
    may retry after `retry_after_s` (RetryInfo)."""

    reason = "REPLICA_FULL"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unimplemented(AgentplaneError):
    reason = "UNIMPLEMENTED"


class ConfigError(AgentplaneError):
    """Invalid configuration; `setting` names the variable or file key at fault."""

    reason = "CONFIG_ERROR"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
