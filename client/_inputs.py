"""Callers in the loop: caller tools, approvals and questions, as Python values.

A session started with ``tools``, ``require_approval`` or an agent that asks questions
waits for its caller: its stream carries an ``input_request`` event, and the caller answers
with ``SessionService.Respond``. This module turns those requests into plain objects for
handlers (:class:`ToolCall`, :class:`PermissionRequest`, :class:`QuestionRequest`) and what
handlers return into ``RespondRequest`` messages:

========================  =====================================================
handler                   returns
========================  =====================================================
``on_tool_call(call)``    ``str`` (text), a ``dict`` (structured content) or a
                          :class:`ToolResult`; an exception answers an error
                          result carrying its message
``on_permission(req)``    ``True`` / ``False``, :class:`Allow` (optionally with
                          an edited input) or :class:`Deny` (with a message)
``on_question(req)``      ``{question text: label}``; several labels may be a
                          list (joined with ", "), free text is fine too
========================  =====================================================

A handler that returns None leaves its request unanswered (someone else may answer it,
with ``respond``, before its deadline). Both clients share this module; they differ only in
how they call handlers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from inspect import isawaitable
from typing import Any, TypeAlias

from google.protobuf import duration_pb2

from ._errors import RPCError
from .v1 import session_pb2

log = logging.getLogger("agentplane")

CALLER_TOOL_PREFIX = "mcp__caller__"

# Respond failures that only mean "someone or something settled it first": the request
# timed out, was answered elsewhere, or the session ended. The `input_resolved` event (or
# the `result`) on the stream says what happened; a handler's late answer is dropped.
SETTLED_REASONS = frozenset({"ALREADY_ANSWERED", "SESSION_ENDED"})


# -- declaring caller tools -----------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A tool the caller runs itself (``RunSessionRequest.tools``).

    The agent sees ``name`` (as ``mcp__caller__<name>``), ``description`` and
    ``input_schema``, a JSON Schema for an object (None: any object). Each call reaches
    ``on_tool_call`` as a :class:`ToolCall` whose ``tool_name`` is ``name``.
    """

    name: str
    description: str = ""
    input_schema: Mapping[str, Any] | None = None

    def to_proto(self) -> session_pb2.CallerTool:
        schema = "" if self.input_schema is None else json.dumps(dict(self.input_schema))
        return session_pb2.CallerTool(
            name=self.name, description=self.description, input_schema_json=schema
        )


ToolLike: TypeAlias = Tool | Mapping[str, Any] | session_pb2.CallerTool
_TOOL_KEYS = frozenset({"name", "description", "input_schema"})


def caller_tool(value: ToolLike) -> session_pb2.CallerTool:
    """The CallerTool for a :class:`Tool`, a dict with its fields, or a CallerTool."""
    if isinstance(value, session_pb2.CallerTool):
        return value
    if isinstance(value, Tool):
        return value.to_proto()
    if isinstance(value, Mapping):
        unknown = set(value) - _TOOL_KEYS
        if unknown:
            raise TypeError(
                f"unknown tool field(s): {', '.join(sorted(map(str, unknown)))} "
                f"(a tool has {', '.join(sorted(_TOOL_KEYS))})"
            )
        if "name" not in value:
            raise TypeError("a tool needs a name")
        return Tool(**value).to_proto()
    raise TypeError(f"a tool must be a Tool, a dict or a CallerTool, not {type(value)!r}")


def caller_tools(values: Sequence[ToolLike] | None) -> list[session_pb2.CallerTool]:
    if values is None:
        return []
    if isinstance(values, (Mapping, Tool, session_pb2.CallerTool)):
        raise TypeError("tools must be a list of tools")
    return [caller_tool(v) for v in values]


Seconds: TypeAlias = float | int | dt.timedelta


def duration(value: Seconds | None) -> duration_pb2.Duration | None:
    """A Duration for seconds or a timedelta (None: unset, the tenant's default)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("a duration cannot be a bool")
    if not isinstance(value, dt.timedelta):
        value = dt.timedelta(seconds=value)
    if value < dt.timedelta(0):
        raise ValueError("answer_timeout must not be negative")
    result = duration_pb2.Duration()
    result.FromTimedelta(value)
    return result


# -- what a session asks --------------------------------------------------------------------


@dataclass(frozen=True)
class InputRequest:
    """What a waiting session asks its caller (an ``input_request`` event).

    ``input`` is the tool's input, decoded; ``deadline`` when the request times out (None
    if the server sent none); ``message`` the ``InputRequest`` proto itself.
    """

    session_id: str
    request_id: str
    tool_name: str
    tool_use_id: str
    input: dict[str, Any]
    deadline: dt.datetime | None
    message: session_pb2.InputRequest = field(repr=False, compare=False)


@dataclass(frozen=True)
class ToolCall(InputRequest):
    """The agent called a caller tool (kind TOOL_CALL): ``tool_name`` is the name it was
    declared with (without ``mcp__caller__``), ``input`` its arguments."""


@dataclass(frozen=True)
class PermissionRequest(InputRequest):
    """A tool that needs approval is about to run (kind PERMISSION): ``tool_name`` is the
    agent's tool (``Bash``, ``Write``, a caller tool's name), ``input`` what it would run
    with."""


@dataclass(frozen=True)
class QuestionOption:
    """One answer a question offers."""

    label: str
    description: str = ""


@dataclass(frozen=True)
class Question:
    """One of the agent's questions (its AskUserQuestion tool)."""

    question: str
    header: str = ""
    options: tuple[QuestionOption, ...] = ()
    multi_select: bool = False


@dataclass(frozen=True)
class QuestionRequest(InputRequest):
    """The agent asks questions (kind QUESTION). Answer with ``{question: label}``; a
    question left out of the answers goes unanswered."""

    questions: tuple[Question, ...] = ()


AnyRequest: TypeAlias = ToolCall | PermissionRequest | QuestionRequest


def _decode_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _questions(data: Mapping[str, Any]) -> tuple[Question, ...]:
    found = []
    for item in data.get("questions") or ():
        if not isinstance(item, Mapping):
            continue
        options = tuple(
            QuestionOption(str(o.get("label", "")), str(o.get("description", "") or ""))
            for o in item.get("options") or ()
            if isinstance(o, Mapping)
        )
        found.append(
            Question(
                question=str(item.get("question", "")),
                header=str(item.get("header", "") or ""),
                options=options,
                multi_select=bool(item.get("multiSelect", False)),
            )
        )
    return tuple(found)


def parse_request(session_id: str, message: session_pb2.InputRequest) -> AnyRequest | None:
    """The handler's view of an ``input_request`` (None for a kind this client does not
    know)."""
    data = _decode_object(message.input_json)
    deadline = message.deadline.ToDatetime(tzinfo=dt.UTC) if message.HasField("deadline") else None
    args = (
        session_id,
        message.request_id,
        message.tool_name,
        message.tool_use_id,
        data,
        deadline,
        message,
    )
    if message.kind == session_pb2.INPUT_KIND_TOOL_CALL:
        return ToolCall(*args)
    if message.kind == session_pb2.INPUT_KIND_PERMISSION:
        return PermissionRequest(*args)
    if message.kind == session_pb2.INPUT_KIND_QUESTION:
        return QuestionRequest(*args, questions=_questions(data))
    return None


# -- answers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolResult:
    """A caller tool's result: ``text`` and/or ``structured`` (a JSON object the model sees
    as JSON after the text); ``is_error`` makes it an error result."""

    text: str = ""
    structured: Mapping[str, Any] | None = None
    is_error: bool = False


@dataclass(frozen=True)
class Allow:
    """Approve the tool call; with ``updated_input``, run it with that input instead."""

    updated_input: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Deny:
    """Refuse the tool call; the agent is told ``message`` (empty: the server's "denied by
    the caller")."""

    message: str = ""


ToolResultLike: TypeAlias = str | Mapping[str, Any] | ToolResult
DecisionLike: TypeAlias = bool | Allow | Deny
AnswersLike: TypeAlias = Mapping[str, str | Sequence[str]]

# The handlers of Client.run (None: leave the request unanswered) ...
ToolCallHandler: TypeAlias = Callable[[ToolCall], ToolResultLike | None]
PermissionHandler: TypeAlias = Callable[[PermissionRequest], DecisionLike | None]
QuestionHandler: TypeAlias = Callable[[QuestionRequest], AnswersLike | None]
# ... and of AsyncClient.run: the same, or coroutine functions.
AsyncToolCallHandler: TypeAlias = Callable[
    [ToolCall], ToolResultLike | None | Awaitable[ToolResultLike | None]
]
AsyncPermissionHandler: TypeAlias = Callable[
    [PermissionRequest], DecisionLike | None | Awaitable[DecisionLike | None]
]
AsyncQuestionHandler: TypeAlias = Callable[
    [QuestionRequest], AnswersLike | None | Awaitable[AnswersLike | None]
]


def tool_result(value: ToolResultLike) -> session_pb2.ToolCallResult:
    if isinstance(value, ToolResult):
        structured = "" if value.structured is None else _json_object(value.structured)
        return session_pb2.ToolCallResult(
            text=value.text, structured_json=structured, is_error=value.is_error
        )
    if isinstance(value, str):
        return session_pb2.ToolCallResult(text=value)
    if isinstance(value, Mapping):
        return session_pb2.ToolCallResult(structured_json=_json_object(value))
    raise TypeError(
        f"a tool call's answer must be a str, a dict or a ToolResult, not {type(value)!r}"
    )


def error_result(exc: BaseException) -> ToolResult:
    """The error result a tool handler's exception answers with: its message."""
    return ToolResult(text=str(exc) or type(exc).__name__, is_error=True)


def decision(value: DecisionLike) -> session_pb2.PermissionDecision:
    if isinstance(value, bool):
        return session_pb2.PermissionDecision(allow=value)
    if isinstance(value, Allow):
        edited = "" if value.updated_input is None else _json_object(value.updated_input)
        return session_pb2.PermissionDecision(allow=True, updated_input_json=edited)
    if isinstance(value, Deny):
        return session_pb2.PermissionDecision(allow=False, message=value.message)
    raise TypeError(f"a permission decision must be a bool, Allow or Deny, not {type(value)!r}")


def answers(value: AnswersLike) -> session_pb2.QuestionAnswer:
    if not isinstance(value, Mapping):
        raise TypeError(f"answers must be a dict of question -> label, not {type(value)!r}")
    flat: dict[str, str] = {}
    for question, answer in value.items():
        if isinstance(answer, str):
            flat[str(question)] = answer
        elif isinstance(answer, Sequence):
            flat[str(question)] = ", ".join(str(a) for a in answer)
        else:
            raise TypeError(f"the answer to {question!r} must be a str or a list of labels")
    return session_pb2.QuestionAnswer(answers=flat)


def _json_object(value: Mapping[str, Any]) -> str:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a dict (a JSON object), not {type(value)!r}")
    return json.dumps(dict(value), ensure_ascii=False)


def respond_request(
    session_id: str,
    request_id: str,
    *,
    tool_result_: ToolResultLike | None = None,
    permission: DecisionLike | None = None,
    answers_: AnswersLike | None = None,
) -> session_pb2.RespondRequest:
    """The RespondRequest for exactly one of the three kinds of answer."""
    given = [v is not None for v in (tool_result_, permission, answers_)]
    if sum(given) != 1:
        raise TypeError("give exactly one of tool_result, permission or answers")
    request = session_pb2.RespondRequest(session_id=session_id, request_id=request_id)
    if tool_result_ is not None:
        request.tool_result.CopyFrom(tool_result(tool_result_))
    elif permission is not None:
        request.permission.CopyFrom(decision(permission))
    else:
        assert answers_ is not None
        request.answer.CopyFrom(answers(answers_))
    return request


# -- dispatching to handlers ----------------------------------------------------------------


@dataclass(frozen=True)
class Handlers:
    """The handlers of one run; a kind without one is left for someone else to answer."""

    on_tool_call: Callable[[ToolCall], Any] | None = None
    on_permission: Callable[[PermissionRequest], Any] | None = None
    on_question: Callable[[QuestionRequest], Any] | None = None

    def __bool__(self) -> bool:
        return any((self.on_tool_call, self.on_permission, self.on_question))

    def pending(self, event: session_pb2.SessionEvent) -> AnyRequest | None:
        """The request of an ``input_request`` event that one of these handlers answers."""
        if not event.HasField("input_request"):
            return None
        request = parse_request(event.session_id, event.input_request)
        return request if self.handler(request) is not None else None

    def handler(self, request: AnyRequest | None) -> Callable[[Any], Any] | None:
        if isinstance(request, ToolCall):
            return self.on_tool_call
        if isinstance(request, PermissionRequest):
            return self.on_permission
        if isinstance(request, QuestionRequest):
            return self.on_question
        return None


def answer_request(request: AnyRequest, value: Any) -> session_pb2.RespondRequest | None:
    """The RespondRequest for what the request's handler returned (None: no answer, the
    request is left for someone else)."""
    if value is None:
        return None
    if isawaitable(value):
        if hasattr(value, "close"):
            value.close()  # a coroutine never awaited would warn
        raise TypeError("Client handlers must be plain functions; async handlers need AsyncClient")
    if isinstance(request, ToolCall):
        return respond_request(request.session_id, request.request_id, tool_result_=value)
    if isinstance(request, PermissionRequest):
        return respond_request(request.session_id, request.request_id, permission=value)
    return respond_request(request.session_id, request.request_id, answers_=value)


def handle(request: AnyRequest, handler: Callable[[Any], Any]) -> session_pb2.RespondRequest | None:
    """Run a synchronous handler; what to send (a tool handler's exception answers an
    error result; the other handlers' exceptions propagate)."""
    try:
        value = handler(request)
    except Exception as exc:
        if not isinstance(request, ToolCall):
            raise
        value = error_result(exc)
    return answer_request(request, value)


async def handle_async(
    request: AnyRequest, handler: Callable[[Any], Any]
) -> session_pb2.RespondRequest | None:
    """:func:`handle` for a handler that may be a coroutine function (or return an
    awaitable)."""
    try:
        value = handler(request)
        if isawaitable(value):
            value = await value
    except Exception as exc:
        if not isinstance(request, ToolCall):
            raise
        value = error_result(exc)
    return answer_request(request, value)


def settled_elsewhere(exc: RPCError, request: AnyRequest) -> bool:
    """Whether a handler's Respond failed only because the request was already settled
    (timed out, answered by someone else, its session ended): then it is dropped."""
    if exc.reason in SETTLED_REASONS:
        log.info(
            "input request %s of session %s was settled before its handler answered: %s",
            request.request_id,
            request.session_id,
            exc,
        )
        return True
    return False


@contextmanager
def unless_settled(request: AnyRequest) -> Iterator[None]:
    """Around a handler's Respond: a failure because the request was settled elsewhere is
    dropped (see :func:`settled_elsewhere`); any other propagates."""
    try:
        yield
    except RPCError as exc:
        if not settled_elsewhere(exc, request):
            raise
