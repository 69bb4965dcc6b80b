"""The benchmarks run once, tiny, inside the suite so that they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Every row `run.py --quick` prints, by the start of its name (sizes follow some names).
ROWS = [
    # 1-3: one session
    "1-turn session, wall",
    "3-tool-turn session, wall",
    "time to first agent event |",
    "1-turn session, wall, warm pool",
    "time to first agent event, warm pool",
    "control-plane CPU per session",
    "sandbox cost: 1-turn session, wall",
    "sandbox cost: CPU per 1-turn session",
    # 4: saturation throughput
    "sessions/s at concurrency 1 |",
    "sessions/s at concurrency 2 |",
    # 5: unary RPCs (PostgreSQL rows say skipped in --quick)
    "GetSession, SQLite |",
    "GetBudget, SQLite |",
    "GetSession, PostgreSQL |",
    "GetBudget, PostgreSQL |",
    # 6: event relay
    "event relay, SQLite",
    "events persisted = streamed, SQLite",
    "DB work per relay session, SQLite",
    "event relay, PostgreSQL",
    "live text, SQLite",
    "live text, session wall time, SQLite",
    # 7: admission under contention (on SQLite in --quick)
    "admission latency p50",
    "admission latency p99",
    "admitted and overspend",
    # 8: scaling
    "server RSS and CPU, 0 idle streams",
    "server RSS and CPU, 2 idle streams",
    "server RSS and CPU, 4 idle streams",
    "GetSession, SQLite, +1,000 rows",
    "ListSessions (page of 50), SQLite, +1,000 rows",
    "sessions/s at concurrency 1, SQLite, +1,000 rows",
    "GetSession, PostgreSQL, seeded rows",
    # 10: the gateway flood
    "gateway flood, 6 x 48 MiB refused (413): server RSS growth",
    "gateway flood, 6 x 48 MiB refused (413): health latency",
    "gateway flood, 2 x 31 MiB of JSON values parsed: server RSS growth",
    "gateway flood, 2 x 31 MiB of JSON values parsed: health latency",
    # 11: webhooks
    "webhook delivery latency p50 / p99, sessions per run: 1",
    "webhook delivery latency p50 / p99, 10 dead receivers of another tenant",
    "1-turn session wall time, 10 dead receivers of another tenant",
]


def test_the_benchmarks_run(tmp_path: Path) -> None:
    script = Path(__file__).parent / "bench" / "run.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ROWS:
        assert f"\n| {name}" in proc.stdout, name
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")
        for line in proc.stdout.splitlines()
        if line.startswith("| ")
    }
    persisted = next(cells for name, cells in rows.items() if name.startswith("events persisted"))
    assert persisted[3] == "1.00"  # every streamed event was persisted
    spend = next(cells for name, cells in rows.items() if name.startswith("admitted and overspend"))
    assert float(spend[3].split()[0]) <= 1.0  # zero overspend
    assert not (tmp_path / "BENCHMARKS.md").exists()  # --quick writes nothing
