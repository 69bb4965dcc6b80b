"""The benchmarks run once, tiny, inside the suite so that they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_benchmarks_run(tmp_path: Path) -> None:
    script = Path(__file__).parent / "bench" / "run.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300,
        check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("1-turn session, wall", "3-tool-turn session, wall", "time to first agent event",
                "control-plane CPU per session"):
        assert f"| {row} |" in proc.stdout
    assert not (tmp_path / "BENCHMARKS.md").exists()  # --quick writes nothing
