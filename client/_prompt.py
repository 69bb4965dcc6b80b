"""`agentplane run`'s answers to a session that waits for its caller.

At a terminal (:class:`TerminalPrompter`) the person approves or denies each tool that
needs approval, seeing the tool and its whole input, and answers the agent's questions
(an option's number, several for a multi-select question, or free text). Elsewhere
(:class:`NoPrompter`: stdin is not a terminal, or ``--deny-all``) approvals are denied and
questions answered with nothing, at once, so the command never hangs. Prompts go to
stderr (stdout carries the events, perhaps into a pipe); answers are read from stdin.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from ._inputs import Deny, PermissionRequest, Question, QuestionRequest

INDENT = "    "


def describe_input(tool_input: dict[str, Any]) -> list[str]:
    """A tool's input, one line per field (multi-line strings indented below their
    name), nothing cut: a person approving it must see all of it."""
    lines: list[str] = []
    for key, value in tool_input.items():
        if isinstance(value, str) and "\n" in value:
            lines.append(f"{INDENT}{key}:")
            lines.extend(f"{INDENT}{INDENT}{line}" for line in value.splitlines())
        elif isinstance(value, str):
            lines.append(f"{INDENT}{key}: {value}")
        else:
            lines.append(f"{INDENT}{key}: {json.dumps(value, ensure_ascii=False)}")
    return lines or [f"{INDENT}(no input)"]


class TerminalPrompter:
    """Asks a person: reads lines from ``stdin``, writes prompts to ``out``."""

    def __init__(self, stdin: TextIO, out: TextIO) -> None:
        self._in = stdin
        self._out = out

    def _say(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def _ask(self, prompt: str) -> str | None:
        """One line (without its newline); None at end of input."""
        self._out.write(prompt)
        self._out.flush()
        line = self._in.readline()
        if not line:
            self._out.write("\n")
            return None
        return line.rstrip("\r\n")

    def permission(self, request: PermissionRequest) -> bool | Deny:
        self._say(f"\nThe agent wants to run {request.tool_name}:")
        for line in describe_input(request.input):
            self._say(line)
        while True:
            reply = self._ask(f"Allow {request.tool_name}? [y/n] ")
            if reply is None:
                return Deny("no answer (end of input)")
            choice = reply.strip().lower()
            if choice in ("y", "yes"):
                return True
            if choice in ("n", "no"):
                break
            self._say("Please answer y or n.")
        message = self._ask("Tell the agent why (optional, Enter to skip): ")
        return Deny((message or "").strip())

    def questions(self, request: QuestionRequest) -> dict[str, str]:
        answers: dict[str, str] = {}
        for question in request.questions:
            answer = self._question(question)
            if answer is None:
                break
            if answer:
                answers[question.question] = answer
        return answers

    def _question(self, question: Question) -> str | None:
        """The answer ("" to leave it unanswered; None at end of input)."""
        title = f"[{question.header}] " if question.header else ""
        self._say(f"\nThe agent asks: {title}{question.question}")
        for number, option in enumerate(question.options, 1):
            extra = f" - {option.description}" if option.description else ""
            self._say(f"{INDENT}{number}. {option.label}{extra}")
        if question.options and question.multi_select:
            hint = "numbers separated by commas, or your own answer"
        elif question.options:
            hint = "a number, or your own answer"
        else:
            hint = "your answer"
        while True:
            reply = self._ask(f"Answer ({hint}; Enter to skip): ")
            if reply is None:
                return None
            reply = reply.strip()
            numbers = _numbers(reply)
            if numbers is None or not question.options:
                return reply  # free text (or "" to skip)
            if not all(1 <= n <= len(question.options) for n in numbers):
                self._say(f"The options are 1 to {len(question.options)}.")
                continue
            labels = [question.options[n - 1].label for n in dict.fromkeys(numbers)]
            if len(labels) > 1 and not question.multi_select:
                self._say("Choose one option (or type your own answer).")
                continue
            return ", ".join(labels)


def _numbers(reply: str) -> list[int] | None:
    """The numbers of a reply like "2" or "1, 3" (None: it is not only numbers)."""
    parts = [p.strip() for p in reply.split(",")]
    if not reply or not all(p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


class NoPrompter:
    """Answers without asking anyone: denies every approval (telling the agent ``reason``)
    and answers questions with nothing; notes each on ``out``."""

    def __init__(self, reason: str, out: TextIO) -> None:
        self.reason = reason
        self._out = out

    def permission(self, request: PermissionRequest) -> Deny:
        self._out.write(f"agentplane: denied {request.tool_name}: {self.reason}\n")
        self._out.flush()
        return Deny(self.reason)

    def questions(self, request: QuestionRequest) -> dict[str, str]:
        self._out.write(f"agentplane: left the agent's questions unanswered: {self.reason}\n")
        self._out.flush()
        return {}
