"""What a caller asks for, and its validation against the tenant's policy."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import jsonschema

from ..approvals import MAX_RULES, Rule, parse_rule
from ..domain import OnBudgetExhausted, usd
from ..errors import InvalidArgument, quote
from ..mcp.servers import covered
from ..tenants import MIN_THINKING_TOKENS, Tenant

MAX_PROMPT_CHARS = 200_000
MAX_LABELS = 32
_LABEL_KEY = re.compile(r"[a-z0-9_.-]{1,63}")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)
# What every session id is (str(uuid4())): anything else cannot name a session.
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_CALLER_TOOLS = 32
MAX_TOOL_DESCRIPTION_CHARS = 4096
MAX_TOOL_SCHEMA_BYTES = 64 << 10
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
# What the agent calls a caller tool: the in-process MCP server's tools are mcp__caller__*.
CALLER_SERVER = "caller"
CALLER_PREFIX = f"mcp__{CALLER_SERVER}__"


def is_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


def no_nul(field: str, value: str) -> None:
    """InvalidArgument on `field` if `value` holds a NUL (no database stores one in text)."""
    if "\0" in value:
        raise InvalidArgument(field, "must not contain NUL characters")


@dataclass(frozen=True)
class CallerTool:
    """A tool the caller runs (its input schema as JSON text until validated)."""

    name: str
    description: str = ""
    input_schema_json: str = ""
    # Filled in by validation: the parsed schema.
    input_schema: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class InputFile:
    """A file for the session's workspace: its relative path and content."""

    path: str
    content: bytes


@dataclass(frozen=True)
class RunRequest:
    """A RunSession request in domain terms (empty/zero fields mean "the default")."""

    prompt: str
    request_id: str = ""
    max_budget_usd: str = ""
    max_turns: int = 0
    allowed_tools: tuple[str, ...] = ()
    model: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    on_disconnect_continue: bool = False
    resume_session_id: str = ""
    caller_tools: tuple[CallerTool, ...] = ()
    require_approval: tuple[str, ...] = ()
    # 0: the tenant's answer_timeout_s.
    answer_timeout_s: float = 0.0
    output_schema_json: str = ""
    input_files: tuple[InputFile, ...] = ()
    include_partial_messages: bool = False
    effort: str = ""
    max_thinking_tokens: int = 0
    fallback_model: str = ""
    # Where the session's events are also sent ("": only the tenant's endpoints).
    callback_url: str = ""
    # END or PAUSE at its budget (None: the tenant's on_budget_exhausted).
    on_budget_exhausted: OnBudgetExhausted | None = None


@dataclass(frozen=True)
class SessionSpec:
    """A validated request with the tenant's defaults filled in."""

    prompt: str
    budget_usd: Decimal
    max_turns: int
    tools: tuple[str, ...]
    model: str
    labels: dict[str, str]
    request_id: str
    on_disconnect_continue: bool
    max_duration_s: float = 3600.0
    # The earlier agentplane session to continue, and (once resolved) its SDK session id.
    resume_session_id: str = ""
    resume_sdk_session_id: str = ""
    # The caller's loop: its tools, the approval rules (the tenant's, then the request's)
    # and how long each answer is waited for.
    caller_tools: tuple[CallerTool, ...] = ()
    require_approval: tuple[str, ...] = ()
    answer_timeout_s: float = 300.0
    # The JSON Schema the result must match (text as given, and parsed), and the files
    # written into the workspace before the agent starts.
    output_schema_json: str = ""
    output_schema: dict[str, Any] | None = None
    input_files: tuple[InputFile, ...] = ()
    # Live text deltas, and the model knobs (empty/0: the CLI's defaults).
    include_partial_messages: bool = False
    effort: str = ""
    max_thinking_tokens: int = 0
    fallback_model: str = ""
    # One of the tenant's webhooks.callback_urls ("": none).
    callback_url: str = ""
    # Pause at its budget instead of ending (and for how long at most).
    on_budget_exhausted: OnBudgetExhausted = OnBudgetExhausted.END
    max_pause_s: float = 3600.0
    # The hash of the request body (see fingerprint), filled in by validate.
    request_hash: str = field(default="", compare=False)

    @property
    def pauses(self) -> bool:
        """Whether the session pauses at its budget (instead of ending)."""
        return self.on_budget_exhausted is OnBudgetExhausted.PAUSE

    @property
    def in_the_loop(self) -> bool:
        """Whether the session may wait for its caller (tools, approvals, questions)."""
        return bool(self.caller_tools or self.require_approval or "AskUserQuestion" in self.tools)

    @property
    def knobs(self) -> tuple[bool, str, int, str]:
        """What the CLI's start depends on besides tools, model and limits."""
        return (
            self.include_partial_messages,
            self.effort,
            self.max_thinking_tokens,
            self.fallback_model,
        )


def _effort(raw: str, tenant: Tenant) -> str:
    effort = raw.strip()
    if effort and effort not in tenant.allowed_efforts:
        allowed = ", ".join(tenant.allowed_efforts) or "none: the model's default only"
        raise InvalidArgument(
            "effort", f"{quote(raw)} is not among the tenant's efforts ({allowed})"
        )
    return effort


def _thinking(raw: int, tenant: Tenant) -> int:
    if raw == 0:
        return 0
    if not tenant.max_thinking_tokens:
        raise InvalidArgument("max_thinking_tokens", "the tenant allows no thinking budget")
    if not MIN_THINKING_TOKENS <= raw <= tenant.max_thinking_tokens:
        raise InvalidArgument(
            "max_thinking_tokens",
            f"must be between {MIN_THINKING_TOKENS} and the tenant's "
            f"maximum {tenant.max_thinking_tokens}, not {raw}",
        )
    return raw


def _fallback(raw: str, model: str, tenant: Tenant) -> str:
    fallback = raw.strip()
    no_nul("fallback_model", raw)
    if not fallback:
        return ""
    if fallback not in tenant.fallback_models:
        allowed = ", ".join(tenant.fallback_models) or "none"
        raise InvalidArgument(
            "fallback_model", f"{quote(raw)} is not among the tenant's fallback models ({allowed})"
        )
    if fallback == model:
        raise InvalidArgument("fallback_model", "must differ from model")
    return fallback


def parse_usd(raw: str, field: str) -> Decimal:
    """A request's amount of US dollars (a plain decimal; not yet rounded)."""
    # ASCII digits only: Decimal() would also take "１" (fullwidth), "1_0" and "1e3".
    if not _DECIMAL.fullmatch(raw.strip()):
        raise InvalidArgument(
            field, f"{quote(raw)} is not a decimal number of US dollars like 0.25"
        )
    return Decimal(raw.strip())


def _budget(raw: str, tenant: Tenant) -> Decimal:
    if not raw.strip():
        return usd(tenant.max_session_budget_usd)
    amount = parse_usd(raw, "max_budget_usd")
    if amount <= 0:
        raise InvalidArgument("max_budget_usd", f"must be greater than 0, not {quote(raw)}")
    if amount > tenant.max_session_budget_usd:
        raise InvalidArgument(
            "max_budget_usd",
            f"{quote(raw)} is above the tenant's per-session maximum of "
            f"{tenant.max_session_budget_usd} USD",
        )
    amount = usd(amount)
    if amount == 0:
        raise InvalidArgument("max_budget_usd", "must be at least 0.000001")
    return amount


def _turns(raw: int, tenant: Tenant) -> int:
    if raw == 0:
        return tenant.max_turns
    if raw < 0 or raw > tenant.max_turns:
        raise InvalidArgument(
            "max_turns", f"must be between 1 and the tenant's maximum {tenant.max_turns}, not {raw}"
        )
    return raw


def _caller_tools(raw: tuple[CallerTool, ...]) -> tuple[CallerTool, ...]:
    if len(raw) > MAX_CALLER_TOOLS:
        raise InvalidArgument("tools", f"at most {MAX_CALLER_TOOLS} tools, not {len(raw)}")
    names = [tool.name for tool in raw]
    return tuple(
        _caller_tool(f"tools[{i}]", tool, taken=set(names[:i])) for i, tool in enumerate(raw)
    )


def _caller_tool(where: str, tool: CallerTool, taken: set[str]) -> CallerTool:
    """`tool` checked, with its schema parsed; `taken`: the names it must not reuse."""
    if not _TOOL_NAME.fullmatch(tool.name):
        raise InvalidArgument(
            f"{where}.name", f"{quote(tool.name)}: names are 1-64 characters of [A-Za-z0-9_-]"
        )
    if tool.name in taken:
        raise InvalidArgument(f"{where}.name", f"{tool.name} is taken by another tool")
    if len(tool.description) > MAX_TOOL_DESCRIPTION_CHARS:
        raise InvalidArgument(
            f"{where}.description",
            f"{tool.name}: at most {MAX_TOOL_DESCRIPTION_CHARS} characters",
        )
    no_nul(f"{where}.description", tool.description)
    return CallerTool(
        tool.name,
        tool.description,
        tool.input_schema_json,
        _schema(f"{where}.input_schema_json", tool),
    )


def _schema(where: str, tool: CallerTool) -> dict[str, Any]:
    """The tool's input schema: a valid JSON Schema whose instances are objects."""
    if not tool.input_schema_json.strip():
        return {"type": "object"}
    return json_schema(where, tool.input_schema_json, f"{tool.name}: ")


def json_schema(where: str, text: str, prefix: str = "") -> dict[str, Any]:
    """`text` as a JSON Schema for objects (InvalidArgument on `where` otherwise)."""
    text = text.strip()
    if len(text.encode()) > MAX_TOOL_SCHEMA_BYTES:
        raise InvalidArgument(where, f"{prefix}the schema is larger than 64 KiB")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(where, f"{prefix}not JSON ({exc})") from None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise InvalidArgument(where, f'{prefix}the schema must be an object with "type": "object"')
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidArgument(
            where, f"{prefix}not a valid JSON Schema: {quote(exc.message)}"
        ) from None
    return schema


def _input_files(raw: tuple[InputFile, ...], tenant: Tenant) -> tuple[InputFile, ...]:
    """Relative, normalised, unique paths within the tenant's limits, none passing through
    a symlink of its workspace template (which is copied into the workspace first)."""
    limits = tenant.files
    if len(raw) > limits.max_input_files:
        raise InvalidArgument(
            "input_files", f"at most {limits.max_input_files} files, not {len(raw)}"
        )
    total = sum(len(f.content) for f in raw)
    if total > limits.max_input_total_bytes:
        raise InvalidArgument(
            "input_files",
            f"{total} bytes in all, above the tenant's {limits.max_input_total_bytes >> 20} MiB",
        )
    seen: set[str] = set()
    folders: set[str] = set()
    for i, file in enumerate(raw):
        where = f"input_files[{i}].path"
        parts = file.path.split("/")
        if (
            not file.path
            or len(file.path) > 1024
            or "\0" in file.path
            or any(part in ("", ".", "..") for part in parts)
        ):
            raise InvalidArgument(
                where,
                f"{quote(file.path)}: a relative path of names "
                "(no leading /, no empty, . or .. parts)",
            )
        if len(file.content) > limits.max_input_file_bytes:
            raise InvalidArgument(
                where,
                f"{quote(file.path)}: {len(file.content)} bytes, above "
                f"the tenant's {limits.max_input_file_bytes >> 20} MiB",
            )
        prefixes = {"/".join(parts[:n]) for n in range(1, len(parts))}
        if file.path in seen or file.path in folders or prefixes & seen:
            raise InvalidArgument(
                where, f"{quote(file.path)} is given twice (or as a file and a folder)"
            )
        seen.add(file.path)
        folders |= prefixes
        template = tenant.workspace_template
        if template is not None and any(
            (template / "/".join(parts[:n])).is_symlink() for n in range(1, len(parts) + 1)
        ):
            raise InvalidArgument(
                where, f"{quote(file.path)} passes through a symlink of the workspace template"
            )
    return raw


def _tool_policy(
    request: RunRequest, tenant: Tenant
) -> tuple[tuple[str, ...], tuple[CallerTool, ...], tuple[str, ...]]:
    """The session's tools, the caller's tools and the approval rules (the tenant's, then
    the request's), checked in one place: the caller's tools and the rules' own form
    first, then every name against the tenant's tools and one another."""
    caller_tools = _caller_tools(request.caller_tools)
    raw_rules = request.require_approval
    if len(raw_rules) > MAX_RULES:
        raise InvalidArgument(
            "require_approval", f"at most {MAX_RULES} rules, not {len(raw_rules)}"
        )
    rules = [_rule(f"require_approval[{i}]", text) for i, text in enumerate(raw_rules)]
    # A request may name one tool of a server the tenant allows as a whole.
    outside = [t for t in request.allowed_tools if not covered(t, tenant.allowed_tools)]
    if outside:
        raise InvalidArgument(
            "allowed_tools",
            f"{', '.join(sorted(set(outside)))} not in the tenant's tools "
            f"({', '.join(tenant.allowed_tools) or 'none'})",
        )
    tools = tuple(dict.fromkeys(request.allowed_tools)) or tenant.allowed_tools
    for i, tool in enumerate(caller_tools):
        if tool.name in tools:
            raise InvalidArgument(f"tools[{i}].name", f"{tool.name} is taken by another tool")
    names = {*tools, *(t.name for t in caller_tools)}
    for i, (text, rule) in enumerate(zip(raw_rules, rules, strict=True)):
        if not covered(rule.tool, names) and not any(covered(t, {rule.tool}) for t in names):
            raise InvalidArgument(
                f"require_approval[{i}]", f"{quote(text)} names no tool of this session"
            )
    approval = (*tenant.require_approval, *(t.strip() for t in raw_rules))
    return tools, caller_tools, tuple(dict.fromkeys(approval))


def _rule(where: str, text: str) -> Rule:
    try:
        return parse_rule(text)
    except ValueError as exc:
        raise InvalidArgument(where, f"{quote(text)}: {exc}") from None


def _answer_timeout(raw: float, tenant: Tenant) -> float:
    if raw == 0:
        return tenant.answer_timeout_s
    if not 0 < raw <= tenant.max_answer_timeout_s:
        raise InvalidArgument(
            "answer_timeout",
            f"must be between 0 and the tenant's maximum of "
            f"{tenant.max_answer_timeout_s:g} s, not {raw:g} s",
        )
    return raw


def check_labels(raw: dict[str, str]) -> dict[str, str]:
    """Labels as RunSession stores them and ListSessions filters by them (InvalidArgument
    on `labels` otherwise: at most MAX_LABELS, keys 1-63 chars of [a-z0-9_.-], values at
    most 256 chars), sorted by key."""
    if len(raw) > MAX_LABELS:
        raise InvalidArgument("labels", f"at most {MAX_LABELS} labels, not {len(raw)}")
    for key, value in raw.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"labels[{quote(key)}]", "keys are 1-63 chars of [a-z0-9_.-]")
        if len(value) > 256:
            raise InvalidArgument(f"labels[{key!r}]", "values are at most 256 chars")
        no_nul(f"labels[{key!r}]", value)
    return dict(sorted(raw.items()))


def validate(request: RunRequest, tenant: Tenant) -> SessionSpec:
    """Check a request against the tenant's policy; raises InvalidArgument naming the field."""
    if not request.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    no_nul("prompt", request.prompt)
    no_nul("model", request.model)
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument("prompt", f"is longer than {MAX_PROMPT_CHARS} characters")
    if request.request_id:
        try:
            uuid.UUID(request.request_id)
        except ValueError:
            raise InvalidArgument("request_id", "must be a UUID") from None
    if len(request.model) > 128:
        raise InvalidArgument("model", "is longer than 128 characters")
    if request.resume_session_id:
        try:
            uuid.UUID(request.resume_session_id)
        except ValueError:
            raise InvalidArgument("resume_session_id", "must be a session id (a UUID)") from None
    model = request.model.strip()
    effort = _effort(request.effort, tenant)
    thinking = _thinking(request.max_thinking_tokens, tenant)
    fallback = _fallback(request.fallback_model, model, tenant)
    max_turns = _turns(request.max_turns, tenant)
    answer_timeout_s = _answer_timeout(request.answer_timeout_s, tenant)
    output_schema = (
        json_schema("output_schema_json", request.output_schema_json)
        if request.output_schema_json.strip()
        else None
    )
    callback_url = (
        tenant.webhooks.check_callback(request.callback_url.strip())
        if request.callback_url.strip()
        else ""
    )
    labels = check_labels(request.labels)
    # What involves other parts of the policy comes last, each part asked once: the
    # tools (MCP servers and approval rules), the files, the money.
    tools, caller_tools, require_approval = _tool_policy(request, tenant)
    input_files = _input_files(request.input_files, tenant)
    budget = _budget(request.max_budget_usd, tenant)
    spec = SessionSpec(
        prompt=request.prompt,
        budget_usd=budget,
        max_turns=max_turns,
        tools=tools,
        caller_tools=caller_tools,
        require_approval=require_approval,
        answer_timeout_s=answer_timeout_s,
        output_schema_json=request.output_schema_json.strip(),
        output_schema=output_schema,
        input_files=input_files,
        model=model,
        include_partial_messages=request.include_partial_messages,
        effort=effort,
        max_thinking_tokens=thinking,
        fallback_model=fallback,
        callback_url=callback_url,
        labels=labels,
        request_id=str(uuid.UUID(request.request_id)) if request.request_id else "",
        on_disconnect_continue=request.on_disconnect_continue,
        max_duration_s=tenant.max_duration_s,
        on_budget_exhausted=request.on_budget_exhausted or tenant.on_budget_exhausted,
        max_pause_s=tenant.max_pause_s,
        resume_session_id=(
            str(uuid.UUID(request.resume_session_id)) if request.resume_session_id else ""
        ),
    )
    return replace(spec, request_hash=fingerprint(spec))


# The knobs of a request that sets none (see SessionSpec.knobs).
_NO_KNOBS = (False, "", 0, "")


def fingerprint(spec: SessionSpec) -> str:
    """A hash of the request body, to tell a true repeat of a request_id from a reuse
    (its resume_sdk_session_id, found later, is no part of it)."""
    body = {
        "prompt": spec.prompt,
        "budget": str(spec.budget_usd),
        "max_turns": spec.max_turns,
        "tools": list(spec.tools),
        "model": spec.model,
        "labels": spec.labels,
        "resume": spec.resume_session_id,
        **(
            {
                "caller": [
                    [[t.name, t.description, t.input_schema_json] for t in spec.caller_tools],
                    list(spec.require_approval),
                    spec.answer_timeout_s,
                ]
            }
            if spec.in_the_loop
            else {}
        ),
        **({"output_schema": spec.output_schema_json} if spec.output_schema_json else {}),
        **(
            {"files": [[f.path, hashlib.sha256(f.content).hexdigest()] for f in spec.input_files]}
            if spec.input_files
            else {}
        ),
        # Only when set, so that earlier requests keep their fingerprints.
        **(
            {
                "knobs": [
                    spec.include_partial_messages,
                    spec.effort,
                    spec.max_thinking_tokens,
                    spec.fallback_model,
                ]
            }
            if spec.knobs != _NO_KNOBS
            else {}
        ),
        **({"callback_url": spec.callback_url} if spec.callback_url else {}),
        **({"pause": True} if spec.pauses else {}),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
