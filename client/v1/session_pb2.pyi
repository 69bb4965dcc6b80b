import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_IDLE: _ClassVar[SessionState]
    SESSION_STATE_RUNNING: _ClassVar[SessionState]
    SESSION_STATE_COMPLETE: _ClassVar[SessionState]
    SESSION_STATE_ERROR: _ClassVar[SessionState]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_BUDGET_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_MAX_TURNS: _ClassVar[ErrorReason]
    ERROR_REASON_CANCELLED: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTDOWN: _ClassVar[ErrorReason]
    ERROR_REASON_AGENT_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_INTERRUPTED: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_API_ERROR: _ClassVar[ErrorReason]
    ERROR_REASON_TIMEOUT: _ClassVar[ErrorReason]
    ERROR_REASON_DATABASE_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_MEMORY_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_PROCESS_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_CPU_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_DISK_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_OUTPUT: _ClassVar[ErrorReason]
    ERROR_REASON_EVENT_LIMIT: _ClassVar[ErrorReason]

class OnBudgetExhausted(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_BUDGET_EXHAUSTED_UNSPECIFIED: _ClassVar[OnBudgetExhausted]
    ON_BUDGET_EXHAUSTED_END: _ClassVar[OnBudgetExhausted]
    ON_BUDGET_EXHAUSTED_PAUSE: _ClassVar[OnBudgetExhausted]

class PauseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAUSE_REASON_UNSPECIFIED: _ClassVar[PauseReason]
    PAUSE_REASON_SESSION_BUDGET: _ClassVar[PauseReason]
    PAUSE_REASON_DAILY_LIMIT: _ClassVar[PauseReason]

class OnDisconnect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_DISCONNECT_UNSPECIFIED: _ClassVar[OnDisconnect]
    ON_DISCONNECT_CANCEL: _ClassVar[OnDisconnect]
    ON_DISCONNECT_CONTINUE: _ClassVar[OnDisconnect]

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_TOOL_CALL: _ClassVar[InputKind]
    INPUT_KIND_PERMISSION: _ClassVar[InputKind]
    INPUT_KIND_QUESTION: _ClassVar[InputKind]

class Decider(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECIDER_UNSPECIFIED: _ClassVar[Decider]
    DECIDER_CALLER: _ClassVar[Decider]
    DECIDER_TIMEOUT: _ClassVar[Decider]
    DECIDER_SESSION_END: _ClassVar[Decider]
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_IDLE: SessionState
SESSION_STATE_RUNNING: SessionState
SESSION_STATE_COMPLETE: SessionState
SESSION_STATE_ERROR: SessionState
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_BUDGET_EXCEEDED: ErrorReason
ERROR_REASON_MAX_TURNS: ErrorReason
ERROR_REASON_CANCELLED: ErrorReason
ERROR_REASON_SHUTDOWN: ErrorReason
ERROR_REASON_AGENT_FAILED: ErrorReason
ERROR_REASON_INTERRUPTED: ErrorReason
ERROR_REASON_MODEL_API_ERROR: ErrorReason
ERROR_REASON_TIMEOUT: ErrorReason
ERROR_REASON_DATABASE_UNAVAILABLE: ErrorReason
ERROR_REASON_MEMORY_LIMIT: ErrorReason
ERROR_REASON_PROCESS_LIMIT: ErrorReason
ERROR_REASON_CPU_LIMIT: ErrorReason
ERROR_REASON_DISK_LIMIT: ErrorReason
ERROR_REASON_INVALID_OUTPUT: ErrorReason
ERROR_REASON_EVENT_LIMIT: ErrorReason
ON_BUDGET_EXHAUSTED_UNSPECIFIED: OnBudgetExhausted
ON_BUDGET_EXHAUSTED_END: OnBudgetExhausted
ON_BUDGET_EXHAUSTED_PAUSE: OnBudgetExhausted
PAUSE_REASON_UNSPECIFIED: PauseReason
PAUSE_REASON_SESSION_BUDGET: PauseReason
PAUSE_REASON_DAILY_LIMIT: PauseReason
ON_DISCONNECT_UNSPECIFIED: OnDisconnect
ON_DISCONNECT_CANCEL: OnDisconnect
ON_DISCONNECT_CONTINUE: OnDisconnect
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_TOOL_CALL: InputKind
INPUT_KIND_PERMISSION: InputKind
INPUT_KIND_QUESTION: InputKind
DECIDER_UNSPECIFIED: Decider
DECIDER_CALLER: Decider
DECIDER_TIMEOUT: Decider
DECIDER_SESSION_END: Decider

class BudgetPause(_message.Message):
    __slots__ = ("reason", "since", "deadline", "pending_budget_usd")
    REASON_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    PENDING_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    reason: PauseReason
    since: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    pending_budget_usd: str
    def __init__(self, reason: _Optional[_Union[PauseReason, str]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pending_budget_usd: _Optional[str] = ...) -> None: ...

class TokenUsage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "server_tool_use")
    class ServerToolUseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CREATION_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TOOL_USE_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    server_tool_use: _containers.ScalarMap[str, int]
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_creation_input_tokens: _Optional[int] = ..., cache_read_input_tokens: _Optional[int] = ..., server_tool_use: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    message: str
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("id", "tenant", "state", "create_time", "start_time", "end_time", "cost_usd", "sdk_cost_usd", "max_budget_usd", "num_turns", "max_turns", "usage", "model", "error", "sdk_session_id", "labels", "result", "allowed_tools", "request_id", "resume_session_id", "awaiting", "caller_tools", "require_approval", "structured_result_json", "output_schema_json", "trace_id", "callback_url", "paused")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    SDK_COST_USD_FIELD_NUMBER: _ClassVar[int]
    MAX_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    NUM_TURNS_FIELD_NUMBER: _ClassVar[int]
    MAX_TURNS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SDK_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AWAITING_FIELD_NUMBER: _ClassVar[int]
    CALLER_TOOLS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    state: SessionState
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    cost_usd: str
    sdk_cost_usd: str
    max_budget_usd: str
    num_turns: int
    max_turns: int
    usage: TokenUsage
    model: str
    error: SessionError
    sdk_session_id: str
    labels: _containers.ScalarMap[str, str]
    result: str
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    resume_session_id: str
    awaiting: _containers.RepeatedCompositeFieldContainer[InputRequest]
    caller_tools: _containers.RepeatedScalarFieldContainer[str]
    require_approval: _containers.RepeatedScalarFieldContainer[str]
    structured_result_json: str
    output_schema_json: str
    trace_id: str
    callback_url: str
    paused: BudgetPause
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cost_usd: _Optional[str] = ..., sdk_cost_usd: _Optional[str] = ..., max_budget_usd: _Optional[str] = ..., num_turns: _Optional[int] = ..., max_turns: _Optional[int] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., model: _Optional[str] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ..., sdk_session_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., result: _Optional[str] = ..., allowed_tools: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., resume_session_id: _Optional[str] = ..., awaiting: _Optional[_Iterable[_Union[InputRequest, _Mapping]]] = ..., caller_tools: _Optional[_Iterable[str]] = ..., require_approval: _Optional[_Iterable[str]] = ..., structured_result_json: _Optional[str] = ..., output_schema_json: _Optional[str] = ..., trace_id: _Optional[str] = ..., callback_url: _Optional[str] = ..., paused: _Optional[_Union[BudgetPause, _Mapping]] = ...) -> None: ...

class RunSessionRequest(_message.Message):
    __slots__ = ("prompt", "request_id", "max_budget_usd", "max_turns", "allowed_tools", "model", "labels", "on_disconnect", "resume_session_id", "tools", "require_approval", "answer_timeout", "output_schema_json", "input_files", "include_partial_messages", "effort", "max_thinking_tokens", "fallback_model", "callback_url", "on_budget_exhausted")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    MAX_TURNS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_FILES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PARTIAL_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    EFFORT_FIELD_NUMBER: _ClassVar[int]
    MAX_THINKING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODEL_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    ON_BUDGET_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    request_id: str
    max_budget_usd: str
    max_turns: int
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    model: str
    labels: _containers.ScalarMap[str, str]
    on_disconnect: OnDisconnect
    resume_session_id: str
    tools: _containers.RepeatedCompositeFieldContainer[CallerTool]
    require_approval: _containers.RepeatedScalarFieldContainer[str]
    answer_timeout: _duration_pb2.Duration
    output_schema_json: str
    input_files: _containers.RepeatedCompositeFieldContainer[InputFile]
    include_partial_messages: bool
    effort: str
    max_thinking_tokens: int
    fallback_model: str
    callback_url: str
    on_budget_exhausted: OnBudgetExhausted
    def __init__(self, prompt: _Optional[str] = ..., request_id: _Optional[str] = ..., max_budget_usd: _Optional[str] = ..., max_turns: _Optional[int] = ..., allowed_tools: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., on_disconnect: _Optional[_Union[OnDisconnect, str]] = ..., resume_session_id: _Optional[str] = ..., tools: _Optional[_Iterable[_Union[CallerTool, _Mapping]]] = ..., require_approval: _Optional[_Iterable[str]] = ..., answer_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., output_schema_json: _Optional[str] = ..., input_files: _Optional[_Iterable[_Union[InputFile, _Mapping]]] = ..., include_partial_messages: _Optional[bool] = ..., effort: _Optional[str] = ..., max_thinking_tokens: _Optional[int] = ..., fallback_model: _Optional[str] = ..., callback_url: _Optional[str] = ..., on_budget_exhausted: _Optional[_Union[OnBudgetExhausted, str]] = ...) -> None: ...

class UpdateSessionBudgetRequest(_message.Message):
    __slots__ = ("session_id", "max_budget_usd")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_budget_usd: str
    def __init__(self, session_id: _Optional[str] = ..., max_budget_usd: _Optional[str] = ...) -> None: ...

class InputFile(_message.Message):
    __slots__ = ("path", "content")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    path: str
    content: bytes
    def __init__(self, path: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256", "omitted_reason")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OMITTED_REASON_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    omitted_reason: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., omitted_reason: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("session_id", "path")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    path: str
    def __init__(self, session_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("artifact", "data", "offset")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    data: bytes
    offset: int
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CallerTool(_message.Message):
    __slots__ = ("name", "description", "input_schema_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    input_schema_json: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., input_schema_json: _Optional[str] = ...) -> None: ...

class StreamSessionRequest(_message.Message):
    __slots__ = ("session_id", "after_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    after_seq: int
    def __init__(self, session_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state", "create_time_start", "create_time_end", "labels", "awaiting", "paused")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_START_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_END_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AWAITING_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: SessionState
    create_time_start: _timestamp_pb2.Timestamp
    create_time_end: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    awaiting: bool
    paused: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., create_time_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., awaiting: _Optional[bool] = ..., paused: _Optional[bool] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id", "seq", "time", "started", "assistant_text", "tool_use", "tool_result", "retrying", "state_change", "system", "thinking", "result", "input_request", "input_resolved", "text_delta", "paused", "budget_raised")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_TEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_USE_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    RETRYING_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    THINKING_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    INPUT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_RAISED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    started: SessionStarted
    assistant_text: AssistantText
    tool_use: ToolUse
    tool_result: ToolResult
    retrying: Retrying
    state_change: StateChange
    system: SystemMessage
    thinking: Thinking
    result: SessionResult
    input_request: InputRequest
    input_resolved: InputResolved
    text_delta: TextDelta
    paused: BudgetPaused
    budget_raised: BudgetRaised
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started: _Optional[_Union[SessionStarted, _Mapping]] = ..., assistant_text: _Optional[_Union[AssistantText, _Mapping]] = ..., tool_use: _Optional[_Union[ToolUse, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., retrying: _Optional[_Union[Retrying, _Mapping]] = ..., state_change: _Optional[_Union[StateChange, _Mapping]] = ..., system: _Optional[_Union[SystemMessage, _Mapping]] = ..., thinking: _Optional[_Union[Thinking, _Mapping]] = ..., result: _Optional[_Union[SessionResult, _Mapping]] = ..., input_request: _Optional[_Union[InputRequest, _Mapping]] = ..., input_resolved: _Optional[_Union[InputResolved, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., paused: _Optional[_Union[BudgetPaused, _Mapping]] = ..., budget_raised: _Optional[_Union[BudgetRaised, _Mapping]] = ...) -> None: ...

class BudgetPaused(_message.Message):
    __slots__ = ("pause", "max_budget_usd", "cost_usd")
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    MAX_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    pause: BudgetPause
    max_budget_usd: str
    cost_usd: str
    def __init__(self, pause: _Optional[_Union[BudgetPause, _Mapping]] = ..., max_budget_usd: _Optional[str] = ..., cost_usd: _Optional[str] = ...) -> None: ...

class BudgetRaised(_message.Message):
    __slots__ = ("max_budget_usd", "previous_budget_usd")
    MAX_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    max_budget_usd: str
    previous_budget_usd: str
    def __init__(self, max_budget_usd: _Optional[str] = ..., previous_budget_usd: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "message_id", "index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    message_id: str
    index: int
    def __init__(self, text: _Optional[str] = ..., message_id: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class InputRequest(_message.Message):
    __slots__ = ("request_id", "kind", "tool_name", "tool_use_id", "input_json", "deadline")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_USE_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: InputKind
    tool_name: str
    tool_use_id: str
    input_json: str
    deadline: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[InputKind, str]] = ..., tool_name: _Optional[str] = ..., tool_use_id: _Optional[str] = ..., input_json: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class InputResolved(_message.Message):
    __slots__ = ("request_id", "kind", "decided_by", "outcome", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: InputKind
    decided_by: Decider
    outcome: str
    message: str
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[InputKind, str]] = ..., decided_by: _Optional[_Union[Decider, str]] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RespondRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "tool_result", "permission", "answer")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    tool_result: ToolCallResult
    permission: PermissionDecision
    answer: QuestionAnswer
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., tool_result: _Optional[_Union[ToolCallResult, _Mapping]] = ..., permission: _Optional[_Union[PermissionDecision, _Mapping]] = ..., answer: _Optional[_Union[QuestionAnswer, _Mapping]] = ...) -> None: ...

class ToolCallResult(_message.Message):
    __slots__ = ("text", "structured_json", "is_error")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_JSON_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    text: str
    structured_json: str
    is_error: bool
    def __init__(self, text: _Optional[str] = ..., structured_json: _Optional[str] = ..., is_error: _Optional[bool] = ...) -> None: ...

class PermissionDecision(_message.Message):
    __slots__ = ("allow", "updated_input_json", "message")
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    UPDATED_INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    allow: bool
    updated_input_json: str
    message: str
    def __init__(self, allow: _Optional[bool] = ..., updated_input_json: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class QuestionAnswer(_message.Message):
    __slots__ = ("answers",)
    class AnswersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.ScalarMap[str, str]
    def __init__(self, answers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RespondResponse(_message.Message):
    __slots__ = ("resolved",)
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    resolved: InputResolved
    def __init__(self, resolved: _Optional[_Union[InputResolved, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class AssistantText(_message.Message):
    __slots__ = ("text", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Thinking(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ToolUse(_message.Message):
    __slots__ = ("tool_use_id", "name", "input_json")
    TOOL_USE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    tool_use_id: str
    name: str
    input_json: str
    def __init__(self, tool_use_id: _Optional[str] = ..., name: _Optional[str] = ..., input_json: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("tool_use_id", "is_error", "content")
    TOOL_USE_ID_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    tool_use_id: str
    is_error: bool
    content: str
    def __init__(self, tool_use_id: _Optional[str] = ..., is_error: _Optional[bool] = ..., content: _Optional[str] = ...) -> None: ...

class Retrying(_message.Message):
    __slots__ = ("attempt", "delay_ms", "reason")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    delay_ms: int
    reason: str
    def __init__(self, attempt: _Optional[int] = ..., delay_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("from_state", "to_state")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    from_state: SessionState
    to_state: SessionState
    def __init__(self, from_state: _Optional[_Union[SessionState, str]] = ..., to_state: _Optional[_Union[SessionState, str]] = ...) -> None: ...

class SystemMessage(_message.Message):
    __slots__ = ("subtype", "data_json")
    SUBTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    subtype: str
    data_json: str
    def __init__(self, subtype: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...

class SessionResult(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...
