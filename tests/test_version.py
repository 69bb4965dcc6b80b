"""`--version` of both commands: the version pip installed (pyproject.toml's)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from agentplane import cli
from agentplane.server import __main__ as server_main


def project_version() -> str:
    with (Path(__file__).parent.parent / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def test_the_client_cli_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"agentplane {project_version()}"


def test_the_server_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        server_main.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"agentplane-server {project_version()}"
