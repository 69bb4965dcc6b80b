"""The `agentplane` command: run sessions and look things up from a terminal.

    agentplane run "prompt" [--budget USD] [--max-turns N] [--tool NAME]... [--model M]
                            [--label k=v]... [--json] [--require-approval PATTERN]...
                            [--answer-timeout SECONDS] [--deny-all]
                            [--schema FILE.json] [--file LOCAL[:REMOTE]]...
    agentplane get ID | list [--state S] [--label k=v] [--limit N] [--awaiting]
    agentplane budget [--date D]
    agentplane health [--service NAME] | cancel ID | stream ID [--after-seq N] | usage
    agentplane respond ID REQUEST_ID (--allow | --deny [MESSAGE] | --answer QUESTION=ANSWER...
                                      | --result TEXT [--error])
    agentplane artifacts ID | download ID PATH [-o FILE] | delete ID

Global flags (before or after the command): --target (default $AGENTPLANE_TARGET or
127.0.0.1:50051; several replicas: HOST:PORT,HOST:PORT or dns:///NAME:PORT), --token
(default $AGENTPLANE_TOKEN), --timeout SECONDS; TLS: --tls, --ca-file PEM (implies --tls),
--cert-file PEM --key-file PEM (a client certificate, mTLS), --server-name NAME.

`run` answers what the session asks its caller: at a terminal it asks you to approve each
tool that needs approval (y/n, and why not) and to answer the agent's questions; with
--deny-all, or when stdin is not a terminal, it denies every approval and answers
questions with nothing, without asking. With --schema (a JSON Schema in a file) its last
line is the session's structured result, as one line of JSON; --file sends a local file
into the session's workspace (as REMOTE, default its name; repeat).

Exit status: 0 success; 1 the session ended in ERROR (or health is not SERVING); 2 usage
error (also: a --file or --schema that cannot be read, a download that cannot be
written); 3 the call failed (gRPC status printed on stderr); 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from . import _prompt
from . import _render as render
from ._channel import TARGET_ENV
from ._client import Client, EventStream
from ._errors import AgentplaneError, RPCError
from ._files import destination, write_file
from ._health import HealthStatus
from ._inputs import Deny, ToolResult
from ._requests import TOKEN_ENV
from ._values import session_state
from ._version import package_version
from .v1 import session_pb2

EXIT_OK = 0
EXIT_SESSION_FAILED = 1
EXIT_USAGE = 2
EXIT_RPC_ERROR = 3
EXIT_INTERRUPTED = 130

Handler = Callable[[Client, argparse.Namespace], int]


# -- argument types (their ValueErrors become argparse usage errors, exit 2) ----------------


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _usd(text: str) -> str:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive amount: {text!r}")
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _state(text: str) -> int:
    try:
        state = session_state(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return state


def _date(text: str) -> str:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None
    return text


def _time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _schema(text: str) -> str:
    """The JSON Schema in the file ``text``, as its JSON text (the server checks it is a
    schema)."""
    try:
        raw = Path(text).read_text()
        json.loads(raw)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {exc}") from None
    return raw


def _input_file(text: str) -> tuple[str, bytes]:
    """LOCAL[:REMOTE] (split at the first colon): the workspace path and the local
    file's content; REMOTE defaults to the local file's name."""
    local, _, remote = text.partition(":")
    if not local:
        raise argparse.ArgumentTypeError(f"expected LOCAL[:REMOTE], got {text!r}")
    try:
        content = Path(local).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {local!r}: {exc.strerror}") from None
    return remote or Path(local).name, content


# -- commands -----------------------------------------------------------------------------


def _out(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(f"agentplane: {text}", file=sys.stderr, flush=True)


def _follow(stream: EventStream, as_json: bool) -> int:
    """Print a session's events as they come; the exit status of its result."""
    final: session_pb2.Session | None = None
    with stream:
        for event in stream:
            _out(render.to_json(event) if as_json else render.event_line(event))
            if event.HasField("result"):
                final = event.result.session
    if final is None:
        _err("the event stream ended without a result")
        return EXIT_RPC_ERROR
    if not as_json:
        _out(render.summary_line(final))
        if final.structured_result_json:  # the last line: ready for `tail -n1 | jq`
            _out(render.structured_json(final))
    if final.state == session_pb2.SESSION_STATE_ERROR:
        _err(f"session {final.id} failed: {render.error_line(final)}")
        return EXIT_SESSION_FAILED
    return EXIT_OK


NOT_A_TERMINAL = "stdin is not a terminal, so nobody was asked (agentplane run)"
DENY_ALL = "denied by agentplane run --deny-all"


def prompter(args: argparse.Namespace) -> _prompt.TerminalPrompter | _prompt.NoPrompter:
    """Who answers the session's approvals and questions: the person at the terminal, or
    nobody (--deny-all, or stdin is not a terminal)."""
    if args.deny_all:
        return _prompt.NoPrompter(DENY_ALL, sys.stderr)
    if not sys.stdin.isatty():
        return _prompt.NoPrompter(NOT_A_TERMINAL, sys.stderr)
    return _prompt.TerminalPrompter(sys.stdin, sys.stderr)


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    answers = prompter(args)
    stream = client.run(
        args.prompt,
        max_budget_usd=args.budget,
        max_turns=args.max_turns,
        allowed_tools=args.tool,
        model=args.model,
        labels=dict(args.label or ()),
        request_id=args.request_id,
        on_disconnect=args.on_disconnect,
        require_approval=args.require_approval,
        answer_timeout=args.answer_timeout,
        on_permission=answers.permission,
        on_question=answers.questions,
        output_schema=args.schema,
        input_files=args.file,
        include_partial_messages=args.partial,
        effort=args.effort,
        max_thinking_tokens=args.max_thinking_tokens,
        fallback_model=args.fallback_model,
        callback_url=args.callback_url,
        on_budget_exhausted=args.on_budget_exhausted,
        timeout=args.timeout,
    )
    return _follow(stream, args.json)


def cmd_stream(client: Client, args: argparse.Namespace) -> int:
    return _follow(client.stream_session(args.id, args.after_seq, timeout=args.timeout), args.json)


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    session = client.get_session(args.id)
    _out(render.to_json(session, indent=2) if args.json else render.session_details(session))
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    session = client.cancel_session(args.id)
    _out(render.to_json(session, indent=2) if args.json else render.session_details(session))
    return EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    sessions = client.iter_sessions(
        limit=args.limit,
        page_size=min(args.limit, 500),
        state=args.state,
        labels=dict(args.label or ()),
        awaiting=args.awaiting,
        paused=args.paused,
    )
    shown = 0
    for session in sessions:
        _out(render.to_json(session) if args.json else render.session_row(session))
        shown += 1
    if not shown and not args.json:  # (JSON lines: none is an empty output)
        print(
            "no sessions"
            + (
                " match these filters"
                if args.state or args.label or args.awaiting or args.paused
                else ""
            ),
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_raise_budget(client: Client, args: argparse.Namespace) -> int:
    session = client.update_session_budget(args.id, args.budget)
    _out(render.to_json(session, indent=2) if args.json else render.session_details(session))
    return EXIT_OK


def cmd_deliveries(client: Client, args: argparse.Namespace) -> int:
    page = client.list_webhook_deliveries(
        page_size=args.limit, session_id=args.session, state=args.state, event=args.event or ""
    )
    for delivery in page.deliveries:
        _out(render.to_json(delivery) if args.json else render.delivery_row(delivery))
    if not page.deliveries and not args.json:
        print("no webhook deliveries", file=sys.stderr)
    return EXIT_OK


def cmd_artifacts(client: Client, args: argparse.Namespace) -> int:
    artifacts = client.list_artifacts(args.id)
    for artifact in artifacts:
        _out(render.to_json(artifact) if args.json else render.artifact_row(artifact))
    if not artifacts and not args.json:
        print("no artifacts", file=sys.stderr)
    return EXIT_OK


def cmd_download(client: Client, args: argparse.Namespace) -> int:
    data = client.get_artifact(args.id, args.path)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return EXIT_OK
    target = destination(args.output or ".", args.path)
    try:
        write_file(target, data)
    except OSError as exc:
        _err(f"cannot write {str(target)!r}: {exc.strerror or exc}")
        return EXIT_USAGE
    _out(f"{args.path} -> {target} ({len(data)} bytes)")
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_session(args.id)
    _out(f"deleted {args.id}")
    return EXIT_OK


def cmd_respond(client: Client, args: argparse.Namespace) -> int:
    if args.answer is not None:
        resolved = client.respond(args.id, args.request_id, answers=dict(args.answer))
    elif args.result is not None:
        resolved = client.respond(
            args.id, args.request_id, tool_result=ToolResult(args.result, is_error=args.error)
        )
    else:
        decision = True if args.allow else Deny(args.deny or "")
        resolved = client.respond(args.id, args.request_id, permission=decision)
    if args.json:
        _out(render.to_json(resolved))
    else:
        _out(render.event_summary(session_pb2.SessionEvent(input_resolved=resolved)))
    return EXIT_OK


def _answer(text: str) -> tuple[str, str]:
    question, sep, answer = text.rpartition("=")
    if not sep or not question:
        raise argparse.ArgumentTypeError(f"expected QUESTION=ANSWER, got {text!r}")
    return question, answer


def cmd_budget(client: Client, args: argparse.Namespace) -> int:
    budget = client.get_budget(args.date)
    _out(render.to_json(budget, indent=2) if args.json else render.budget_details(budget))
    return EXIT_OK


def cmd_usage(client: Client, args: argparse.Namespace) -> int:
    usage = client.get_usage(start_time=args.since, end_time=args.until)
    _out(render.to_json(usage, indent=2, all_fields=True))  # "sessions_failed": "0" too
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    _out(status.name)
    return EXIT_OK if status == HealthStatus.SERVING else EXIT_SESSION_FAILED


# -- the parser ---------------------------------------------------------------------------


def _add_globals(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--target/--token/--timeout, accepted before the command and (``suppress``: without
    overriding an earlier value) after it."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=default(None),
        help="host:port of the server, or several replicas: host:port,host:port or "
        f"dns:///name:port (default: ${TARGET_ENV} or 127.0.0.1:50051)",
    )
    group.add_argument(
        "--token", default=default(None), help=f"bearer token (default: ${TOKEN_ENV})"
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(None),
        metavar="SECONDS",
        help="deadline of each call (for run/stream: of the whole session)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect with TLS, verifying the server with the system's CAs (or --ca-file)",
    )
    group.add_argument(
        "--ca-file",
        default=default(None),
        metavar="PEM",
        help="CA certificate(s) to verify the server with (implies --tls)",
    )
    group.add_argument(
        "--cert-file",
        default=default(None),
        metavar="PEM",
        help="client certificate chain, for a server that requires one (mTLS)",
    )
    group.add_argument(
        "--key-file",
        default=default(None),
        metavar="PEM",
        help="the client certificate's private key",
    )
    group.add_argument(
        "--server-name",
        default=default(None),
        metavar="NAME",
        help="the name the server's certificate must carry, when it is not "
        "the target's host (e.g. dialling 127.0.0.1 in a pod)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentplane",
        description="Run Claude agent sessions on an agentplane server and look them up.",
        epilog="Exit status: 0 ok, 1 session ERROR / not SERVING, 2 usage, 3 RPC error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _add_globals(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        _add_globals(sub, suppress=True)
        sub.set_defaults(handler=handler)
        return sub

    def json_flag(sub: argparse.ArgumentParser, help_: str = "print JSON") -> None:
        sub.add_argument("--json", action="store_true", help=help_)

    run = command("run", cmd_run, "run a session and stream its events")
    run.add_argument("prompt")
    run.add_argument("--budget", type=_usd, metavar="USD", help="the session's budget")
    run.add_argument("--max-turns", type=_positive_int, metavar="N")
    run.add_argument(
        "--tool",
        action="append",
        metavar="NAME",
        help="allow this tool (repeat; default: all of the tenant's tools)",
    )
    run.add_argument("--model", metavar="M")
    run.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE")
    run.add_argument("--request-id", metavar="UUID", help="idempotency key")
    run.add_argument(
        "--on-disconnect",
        choices=["cancel", "continue"],
        help="what the server does if this command goes away (default: cancel)",
    )
    run.add_argument(
        "--require-approval",
        action="append",
        metavar="PATTERN",
        help="ask before each use of this tool: a name (Bash) or a pattern "
        '("Bash(git push:*)", "Write(src/*)"); repeat',
    )
    run.add_argument(
        "--answer-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="how long the session waits for each answer (default: the tenant's)",
    )
    run.add_argument(
        "--deny-all",
        action="store_true",
        help="deny every approval and leave questions unanswered, without "
        "asking (the default when stdin is not a terminal)",
    )
    run.add_argument(
        "--schema",
        type=_schema,
        metavar="FILE.json",
        help="a JSON Schema the result must match; the structured result is "
        "printed last, as JSON (with --json: in the result event)",
    )
    run.add_argument(
        "--file",
        action="append",
        type=_input_file,
        metavar="LOCAL[:REMOTE]",
        help="put a local file into the session's workspace, as REMOTE (default: its name); repeat",
    )
    run.add_argument(
        "--partial",
        action="store_true",
        help="stream the agent's text as it is written (text_delta events)",
    )
    run.add_argument("--effort", help="the model's effort (within the tenant's allowed_efforts)")
    run.add_argument(
        "--max-thinking-tokens",
        type=int,
        metavar="N",
        help="the model's thinking budget (at most the tenant's)",
    )
    run.add_argument(
        "--fallback-model",
        metavar="MODEL",
        help="the model to use when the first is overloaded (one of the tenant's fallback_models)",
    )
    run.add_argument(
        "--callback-url",
        metavar="URL",
        help="also send this session's signed webhooks here (one of the tenant's callback_urls)",
    )
    run.add_argument(
        "--on-budget-exhausted",
        choices=["end", "pause"],
        help="at its budget, end the session or pause it until `raise-budget` "
        "(default: the tenant's)",
    )
    json_flag(run, "print each event as one JSON line")

    get = command("get", cmd_get, "show one session")
    get.add_argument("id")
    json_flag(get)

    lst = command("list", cmd_list, "list sessions, newest first")
    lst.add_argument("--state", type=_state, help="idle, running, complete or error")
    lst.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE")
    lst.add_argument("--limit", type=_positive_int, default=20, metavar="N")
    lst.add_argument(
        "--awaiting", action="store_true", help="only sessions waiting for their caller's answer"
    )
    lst.add_argument("--paused", action="store_true", help="only sessions paused at their budget")
    json_flag(lst, "print each session as one JSON line")

    raise_budget = command(
        "raise-budget",
        cmd_raise_budget,
        "raise a session's budget (a session paused at its budget goes on)",
    )
    raise_budget.add_argument("id")
    raise_budget.add_argument("budget", type=_usd, metavar="USD", help="the new budget")
    json_flag(raise_budget)

    deliveries = command(
        "deliveries", cmd_deliveries, "list the tenant's webhook deliveries, newest first"
    )
    deliveries.add_argument("--session", metavar="ID", help="only this session's")
    deliveries.add_argument("--state", choices=["pending", "delivered", "failed"])
    deliveries.add_argument("--event", metavar="TYPE", help='e.g. "session.ended"')
    deliveries.add_argument("--limit", type=_positive_int, default=20, metavar="N")
    json_flag(deliveries, "print each delivery as one JSON line")

    budget = command("budget", cmd_budget, "show the tenant's budget window")
    budget.add_argument("--date", type=_date, metavar="YYYY-MM-DD", help="default: today")
    json_flag(budget)

    health = command("health", cmd_health, "check the server's health (exit 0 if SERVING)")
    health.add_argument(
        "--service", default="", metavar="NAME", help='e.g. "readiness" (default: the whole server)'
    )

    cancel = command("cancel", cmd_cancel, "cancel a session")
    cancel.add_argument("id")
    json_flag(cancel)

    stream = command("stream", cmd_stream, "replay and follow a session's events")
    stream.add_argument("id")
    stream.add_argument("--after-seq", type=_non_negative_int, default=0, metavar="N")
    json_flag(stream, "print each event as one JSON line")

    respond = command(
        "respond", cmd_respond, "answer what a running session waits for (its input_request)"
    )
    respond.add_argument("id", help="the session")
    respond.add_argument("request_id", help="the input_request's request_id")
    answer = respond.add_mutually_exclusive_group(required=True)
    answer.add_argument("--allow", action="store_true", help="approve the tool call")
    answer.add_argument(
        "--deny", nargs="?", const="", metavar="MESSAGE", help="deny it (the agent is told MESSAGE)"
    )
    answer.add_argument(
        "--answer",
        action="append",
        type=_answer,
        metavar="QUESTION=ANSWER",
        help="answer a question with an option's label or free text (repeat)",
    )
    answer.add_argument("--result", metavar="TEXT", help="a caller tool's result")
    respond.add_argument("--error", action="store_true", help="with --result: it failed")
    json_flag(respond)

    artifacts = command(
        "artifacts", cmd_artifacts, "list the files an ended session created or changed"
    )
    artifacts.add_argument("id")
    json_flag(artifacts, "print each artifact as one JSON line")

    download = command("download", cmd_download, "download one artifact of a session")
    download.add_argument("id")
    download.add_argument("path", help="the artifact's path in the workspace")
    download.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="where to write it: a file, a directory, or - for stdout "
        "(default: its name, in the current directory)",
    )

    delete = command(
        "delete", cmd_delete, "delete an ended session: its events, transcript and artifacts"
    )
    delete.add_argument("id")

    usage = command("usage", cmd_usage, "show the tenant's usage, per model too (JSON)")
    usage.add_argument("--since", type=_time, metavar="TIME", help="ISO 8601, e.g. 2025-01-31")
    usage.add_argument("--until", type=_time, metavar="TIME")
    return parser


def _tls_files(args: argparse.Namespace) -> dict[str, Any]:
    """The Client's TLS arguments from --tls, --ca-file, --cert-file, --key-file and
    --server-name, each of which but --tls implies TLS (the files read here; OSError when
    one cannot be, ValueError for a certificate without its key or a key without it)."""
    if (args.cert_file is None) != (args.key_file is None):
        raise ValueError(
            "--cert-file and --key-file go together (a client certificate and its key)"
        )
    files = {
        "root_certificates": args.ca_file,
        "certificate_chain": args.cert_file,
        "private_key": args.key_file,
    }
    tls: dict[str, Any] = {
        name: Path(path).read_bytes() for name, path in files.items() if path is not None
    }
    if args.server_name is not None:
        tls["server_name"] = args.server_name
    if args.tls or tls:
        tls["secure"] = True
    return tls


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        tls = _tls_files(args)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _err(f"cannot read {exc.filename}: {exc.strerror}")
        return EXIT_USAGE
    try:
        client = Client(args.target, token=args.token, timeout=args.timeout, **tls)
    except ValueError as exc:  # a bad address list, from --target or $AGENTPLANE_TARGET
        _err(f"target: {exc}")
        return EXIT_USAGE
    try:
        with client:
            return int(args.handler(client, args))
    except RPCError as exc:
        _err(" ".join(str(exc).split()))
        return EXIT_RPC_ERROR
    except AgentplaneError as exc:  # a download whose chunks did not add up
        _err(str(exc))
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `agentplane list | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
