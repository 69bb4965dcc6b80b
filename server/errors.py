"""Domain errors. Only `api/` maps them to gRPC status codes.

    AgentplaneError
    ├── InvalidArgument      a request field is wrong (names the field)
    ├── Unauthenticated      no or unknown caller token
    ├── NotFound             no such session for this tenant
    ├── FailedPrecondition   the action does not fit the session's state
    ├── QuotaExceeded        admission refused: BUDGET_EXCEEDED or CONCURRENCY_LIMIT
    ├── Unavailable          the server cannot take work now (not ready, draining)
    ├── Unimplemented        a capability this release does not have yet
    └── ConfigError          invalid configuration at start-up (names the setting)
"""

from __future__ import annotations


class AgentplaneError(Exception):
    """The root of agentplane's own errors."""


class InvalidArgument(AgentplaneError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class Unauthenticated(AgentplaneError):
    pass


class NotFound(AgentplaneError):
    pass


class FailedPrecondition(AgentplaneError):
    pass


class QuotaExceeded(AgentplaneError):
    """Admission refused; `reason` is BUDGET_EXCEEDED or CONCURRENCY_LIMIT."""

    def __init__(self, reason: str, subject: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.subject = subject


class Unavailable(AgentplaneError):
    pass


class Unimplemented(AgentplaneError):
    pass


class ConfigError(AgentplaneError):
    """Invalid configuration; `setting` names the variable or file key at fault."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
