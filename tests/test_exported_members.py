"""The public surface of the `agentplane` client package is pinned: a name that appears or
disappears fails here until this list changes with it (and the CHANGELOG says so)."""

from __future__ import annotations

import types

import agentplane

EXPORTED = [
    "DEFAULT_TARGET",
    "TARGET_ENV",
    "TOKEN_ENV",
    "AgentplaneError",
    "Allow",
    "ArtifactError",
    "AsyncClient",
    "AsyncEventStream",
    "Client",
    "Deny",
    "EventStream",
    "FieldViolation",
    "HealthStatus",
    "InputRequest",
    "PermissionRequest",
    "Question",
    "QuestionOption",
    "QuestionRequest",
    "QuotaViolation",
    "RPCError",
    "SessionFailed",
    "Tool",
    "ToolCall",
    "ToolResult",
    "service_config",
    "structured_result",
]


def public_attributes() -> set[str]:
    """What `agentplane.` offers that is not private, bar its submodules (`agentplane.v1`,
    `agentplane.cli`: attributes once something imported them)."""
    return {
        name
        for name, value in vars(agentplane).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_lists_exactly_the_pinned_names() -> None:
    assert sorted(agentplane.__all__) == sorted(EXPORTED)
    assert len(agentplane.__all__) == len(set(agentplane.__all__))  # none twice


def test_every_public_attribute_is_exported() -> None:
    """A public name added to the package but not to __all__ (or this list) fails."""
    assert public_attributes() == set(EXPORTED)


def test_every_exported_name_resolves() -> None:
    """`from agentplane import *` (which reads __all__) finds each name."""
    for name in agentplane.__all__:
        assert hasattr(agentplane, name), name
