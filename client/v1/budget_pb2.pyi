import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetBudgetRequest(_message.Message):
    __slots__ = ("date",)
    DATE_FIELD_NUMBER: _ClassVar[int]
    date: str
    def __init__(self, date: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("tenant", "date", "time_zone", "window_start", "window_end", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "max_session_budget_usd", "max_turns", "max_concurrent_sessions")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    LIMIT_USD_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    RESERVED_USD_FIELD_NUMBER: _ClassVar[int]
    REMAINING_USD_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    MAX_TURNS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    date: str
    time_zone: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    limit_usd: str
    spent_usd: str
    reserved_usd: str
    remaining_usd: str
    max_session_budget_usd: str
    max_turns: int
    max_concurrent_sessions: int
    def __init__(self, tenant: _Optional[str] = ..., date: _Optional[str] = ..., time_zone: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit_usd: _Optional[str] = ..., spent_usd: _Optional[str] = ..., reserved_usd: _Optional[str] = ..., remaining_usd: _Optional[str] = ..., max_session_budget_usd: _Optional[str] = ..., max_turns: _Optional[int] = ..., max_concurrent_sessions: _Optional[int] = ...) -> None: ...
