import datetime

from agentplane.v1 import session_pb2 as _session_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetUsageRequest(_message.Message):
    __slots__ = ("start_time", "end_time")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("tenant", "start_time", "end_time", "sessions_total", "sessions_succeeded", "sessions_failed", "failures_by_reason", "success_rate", "total_cost_usd", "average_cost_usd", "total_turns", "tool_uses", "models", "sessions_short", "shortfall_usd")
    class FailuresByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ToolUsesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FAILED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_USD_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_COST_USD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TURNS_FIELD_NUMBER: _ClassVar[int]
    TOOL_USES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_SHORT_FIELD_NUMBER: _ClassVar[int]
    SHORTFALL_USD_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    sessions_total: int
    sessions_succeeded: int
    sessions_failed: int
    failures_by_reason: _containers.ScalarMap[str, int]
    success_rate: float
    total_cost_usd: str
    average_cost_usd: str
    total_turns: int
    tool_uses: _containers.ScalarMap[str, int]
    models: _containers.RepeatedCompositeFieldContainer[ModelUsage]
    sessions_short: int
    shortfall_usd: str
    def __init__(self, tenant: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sessions_total: _Optional[int] = ..., sessions_succeeded: _Optional[int] = ..., sessions_failed: _Optional[int] = ..., failures_by_reason: _Optional[_Mapping[str, int]] = ..., success_rate: _Optional[float] = ..., total_cost_usd: _Optional[str] = ..., average_cost_usd: _Optional[str] = ..., total_turns: _Optional[int] = ..., tool_uses: _Optional[_Mapping[str, int]] = ..., models: _Optional[_Iterable[_Union[ModelUsage, _Mapping]]] = ..., sessions_short: _Optional[int] = ..., shortfall_usd: _Optional[str] = ...) -> None: ...

class ModelUsage(_message.Message):
    __slots__ = ("model", "requests_total", "requests_by_outcome", "usage", "cost_usd")
    class RequestsByOutcomeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    model: str
    requests_total: int
    requests_by_outcome: _containers.ScalarMap[str, int]
    usage: _session_pb2.TokenUsage
    cost_usd: str
    def __init__(self, model: _Optional[str] = ..., requests_total: _Optional[int] = ..., requests_by_outcome: _Optional[_Mapping[str, int]] = ..., usage: _Optional[_Union[_session_pb2.TokenUsage, _Mapping]] = ..., cost_usd: _Optional[str] = ...) -> None: ...
