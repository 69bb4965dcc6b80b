"""Scripted Anthropic Messages API server: the model double for the bundled CLI.

Point the CLI at :attr:`SandboxServer.base_url` through ``ANTHROPIC_BASE_URL``; a prompt
containing ``[[sandbox:NAME]]`` is answered step by step from the script named NAME.
"""

from .routing import is_side_request
from .script import HttpFailure, Script, Step, ToolCall, Usage, load_scripts, scripts_from_dict
from .server import FINISHED_TEXT, GREETING, RecordedRequest, SandboxServer

__all__ = [
    "FINISHED_TEXT",
    "GREETING",
    "HttpFailure",
    "RecordedRequest",
    "SandboxServer",
    "Script",
    "Step",
    "ToolCall",
    "Usage",
    "is_side_request",
    "load_scripts",
    "scripts_from_dict",
]
