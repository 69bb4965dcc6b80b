"""`agentplane run`'s prompts at a terminal, with fake stdin/stderr streams (the pty and
real-process runs are in test_cli.py)."""

from __future__ import annotations

import io
import json

from agentplane import Deny, PermissionRequest, QuestionRequest
from agentplane import _inputs as inputs
from agentplane._prompt import NoPrompter, TerminalPrompter
from agentplane.v1 import session_pb2
from model_view import QUESTION, question_input


def permission(tool: str = "Bash", **tool_input: object) -> PermissionRequest:
    parsed = inputs.parse_request(
        "s",
        session_pb2.InputRequest(
            request_id="r",
            kind=session_pb2.INPUT_KIND_PERMISSION,
            tool_name=tool,
            input_json=json.dumps(tool_input),
        ),
    )
    assert isinstance(parsed, PermissionRequest)
    return parsed


def question(multi_select: bool = False) -> QuestionRequest:
    parsed = inputs.parse_request(
        "s",
        session_pb2.InputRequest(
            request_id="r",
            kind=session_pb2.INPUT_KIND_QUESTION,
            tool_name="AskUserQuestion",
            input_json=json.dumps(question_input(multi_select)),
        ),
    )
    assert isinstance(parsed, QuestionRequest)
    return parsed


def prompter(typed: str) -> tuple[TerminalPrompter, io.StringIO]:
    out = io.StringIO()
    return TerminalPrompter(io.StringIO(typed), out), out


def test_approving_shows_the_tool_and_its_whole_input() -> None:
    ask, out = prompter("maybe\ny\n")
    long = "x" * 500
    assert ask.permission(permission(command="rm -rf build", description=long)) is True
    shown = out.getvalue()
    assert "The agent wants to run Bash:" in shown
    assert "    command: rm -rf build" in shown and long in shown  # nothing cut
    assert shown.count("Allow Bash? [y/n] ") == 2 and "Please answer y or n." in shown


def test_multi_line_input_is_indented_under_its_name() -> None:
    ask, out = prompter("YES\n")
    assert ask.permission(permission("Write", file_path="a.py", content="one\ntwo", n=3)) is True
    assert "    content:\n        one\n        two\n" in out.getvalue()
    assert "    n: 3" in out.getvalue()


def test_denying_asks_why_and_end_of_input_denies() -> None:
    ask, out = prompter("n\nnot in production\n")
    assert ask.permission(permission(command="ls")) == Deny("not in production")
    assert "Tell the agent why" in out.getvalue()
    ask, _ = prompter("no\n\n")
    assert ask.permission(permission(command="ls")) == Deny("")
    ask, _ = prompter("")
    assert ask.permission(permission(command="ls")) == Deny("no answer (end of input)")


def test_questions_take_an_option_number_or_free_text() -> None:
    ask, out = prompter("2\n")
    assert ask.questions(question()) == {QUESTION: "Mango"}
    shown = out.getvalue()
    assert f"The agent asks: [Fruit] {QUESTION}" in shown
    assert "    1. Papaya - the magic word" in shown and "    2. Mango - another fruit" in shown

    ask, out = prompter("7\n1, 2\nGuava, please\n")
    assert ask.questions(question()) == {QUESTION: "Guava, please"}
    assert "The options are 1 to 2." in out.getvalue()
    assert "Choose one option" in out.getvalue()


def test_multi_select_questions_take_several_numbers_and_can_be_skipped() -> None:
    ask, _ = prompter("2,1,2\n")
    assert ask.questions(question(multi_select=True)) == {QUESTION: "Mango, Papaya"}
    ask, _ = prompter("\n")
    assert ask.questions(question(multi_select=True)) == {}
    ask, _ = prompter("")
    assert ask.questions(question()) == {}


def test_without_a_person_approvals_are_denied_and_questions_left_unanswered() -> None:
    out = io.StringIO()
    nobody = NoPrompter("stdin is not a terminal", out)
    assert nobody.permission(permission(command="ls")) == Deny("stdin is not a terminal")
    assert nobody.questions(question()) == {}
    assert "denied Bash: stdin is not a terminal" in out.getvalue()
