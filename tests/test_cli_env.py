"""The session folders and the CLI environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentplane.server.sandbox.cli_env import NO_OUTBOUND_TRAFFIC, SessionDirs, cli_environment


def test_session_folders_are_private_and_leave_their_parent_alone(short_tmp: Path) -> None:
    parent = short_tmp
    parent.chmod(0o755)
    dirs = SessionDirs(parent / "s1")
    dirs.create()
    assert parent.stat().st_mode & 0o777 == 0o755  # e.g. /tmp must keep its mode
    for path in (dirs.root, dirs.cwd, dirs.home, dirs.config, dirs.tmp):
        assert path.stat().st_mode & 0o777 == 0o700


def test_the_cli_environment_stops_outbound_traffic_and_scrubs_keys(
    monkeypatch: pytest.MonkeyPatch,
    session_dirs: SessionDirs,
) -> None:
    monkeypatch.setenv("OTHER_TENANT_KEY", "sk-ant-other")
    dirs = session_dirs
    env = cli_environment(
        dirs, base_url="http://127.0.0.1:1", api_key="tok", scrub={"OTHER_TENANT_KEY"}
    )
    assert all(env[k] == v for k, v in NO_OUTBOUND_TRAFFIC.items())
    assert env["OTHER_TENANT_KEY"] == ""
    assert env["ANTHROPIC_API_KEY"] == "tok" and env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1"
    assert {env["HOME"], env["CLAUDE_CONFIG_DIR"], env["TMPDIR"], env["CLAUDE_CODE_TMPDIR"]} <= {
        str(dirs.home),
        str(dirs.config),
        str(dirs.tmp),
    }
    with pytest.raises(ValueError, match="AGENTPLANE_WORK_DIR"):
        cli_environment(SessionDirs(Path("/tmp/" + "x" * 90)), base_url=None, api_key="k")
