"""agentplane: client for the agentplane control plane.

    from agentplane import Client

    with Client("127.0.0.1:50051", token="...") as client:
        for event in client.run("Summarise README.md", max_budget_usd="0.50"):
            print(event.seq, event.WhichOneof("kind"))

:class:`AsyncClient` has the same methods for asyncio. Several replicas:
``Client(["10.0.0.1:50051", "10.0.0.2:50051"])`` or ``Client("dns:///agentplane:50051")``
balances over them, health-checked; :func:`service_config` is the grpc service config
behind it, for other clients. Callers in the loop: ``run(..., tools=[Tool(...)], require_approval=["Bash"],
on_tool_call=..., on_permission=..., on_question=...)`` answers the session's
``input_request`` events with its handlers (see :meth:`Client.run`). Files and results:
``run(..., input_files={"spec.md": b"..."}, output_schema={...})``,
:func:`structured_result` (or ``client.run_for_result(prompt, schema)``, which raises
:class:`SessionFailed` for a session that ended ERROR), ``list_artifacts``,
``get_artifact``, ``download_artifact`` and ``delete_session``. Messages are the
generated protos in
:mod:`agentplane.v1`; failed calls raise :class:`RPCError` (see :mod:`agentplane._errors`).
"""

from ._async_client import AsyncClient, AsyncEventStream
from ._channel import DEFAULT_TARGET, TARGET_ENV, service_config
from ._client import Client, EventStream
from ._errors import (
    AgentplaneError,
    ArtifactError,
    FieldViolation,
    QuotaViolation,
    RPCError,
    SessionFailed,
)
from ._files import structured_result
from ._health import HealthStatus
from ._inputs import (
    Allow,
    Deny,
    InputRequest,
    PermissionRequest,
    Question,
    QuestionOption,
    QuestionRequest,
    Tool,
    ToolCall,
    ToolResult,
)
from ._requests import TOKEN_ENV

__all__ = [
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
