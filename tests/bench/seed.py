"""Seed rows straight into the server's `sessions` and `session_events` tables (benchmark 8):
finished sessions of one tenant, one `started` event each, older than any real session.

SQLite gets batched executemany INSERTs on one transaction, PostgreSQL gets COPY; either way a
million rows take seconds, not the hours the API would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from common import MODEL, connect

EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
CHUNK = 50_000


def _session(i: int, tenant: str) -> dict[str, Any]:
    created = EPOCH + timedelta(seconds=i)
    return {
        "id": str(uuid.UUID(int=i + 1)),  # never a uuid4: no clash with real sessions
        "tenant": tenant,
        "state": "COMPLETE",
        "created_at": created,
        "started_at": created,
        "ended_at": created + timedelta(seconds=1),
        "request_id": None,
        "request_hash": "0" * 64,
        "model": MODEL,
        "allowed_tools": json.dumps(["Read"]),
        "labels": "{}",
        "max_budget_usd": Decimal(1),
        "max_turns": 8,
        "budget_day": created.date().isoformat(),
        "resumed_from": None,
        "cost_usd": Decimal("0.0016"),
        "sdk_cost_usd": Decimal("0.0016"),
        "shortfall_usd": Decimal(0),
        "num_turns": 1,
        "input_tokens": 500,
        "output_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "error_reason": None,
        "error_message": "",
        "sdk_session_id": "",
        "result": "done",
        "owner": None,
        "lease_expires_at": None,
    }


def _event(session: dict[str, Any]) -> dict[str, Any]:
    return {
        "session_id": session["id"],
        "seq": 1,
        "time": session["created_at"],
        "kind": "started",
        "payload": json.dumps({"seeded": True}),
    }


def sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):  # what SQLAlchemy's SQLite DATETIME stores (naive UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, Decimal):  # Money is integer micro-dollars on SQLite
        return int(value * 1_000_000)
    return value


def _rows(start: int, count: int, tenant: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for i in range(start, start + count):
        session = _session(i, tenant)
        yield session, _event(session)


def seed(database_url: str, start: int, count: int, tenant: str = "acme") -> None:
    """Add sessions start..start+count-1 (and their events); ids are deterministic."""
    with connect(database_url) as conn:
        if database_url.startswith("sqlite"):
            _seed_sqlite(conn, start, count, tenant)
        else:
            _seed_postgres(conn, start, count, tenant)


def _columns(conn: Any, table: str, sqlite: bool) -> list[str]:
    if sqlite:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    return [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "AND table_schema = current_schema() ORDER BY ordinal_position",
            (table,),
        )
    ]


def _seed_sqlite(conn: Any, start: int, count: int, tenant: str) -> None:
    s_cols, e_cols = _columns(conn, "sessions", True), _columns(conn, "session_events", True)
    s_sql = f"INSERT INTO sessions ({', '.join(s_cols)}) VALUES ({', '.join('?' * len(s_cols))})"
    e_sql = (
        f"INSERT INTO session_events ({', '.join(e_cols)}) VALUES ({', '.join('?' * len(e_cols))})"
    )
    rows = _rows(start, count, tenant)
    conn.execute("BEGIN")
    while True:
        chunk = [pair for _, pair in zip(range(CHUNK), rows, strict=False)]
        if not chunk:
            break
        conn.executemany(s_sql, [tuple(sqlite_value(s.get(c)) for c in s_cols) for s, _ in chunk])
        conn.executemany(e_sql, [tuple(sqlite_value(e.get(c)) for c in e_cols) for _, e in chunk])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _seed_postgres(conn: Any, start: int, count: int, tenant: str) -> None:
    s_cols, e_cols = _columns(conn, "sessions", False), _columns(conn, "session_events", False)
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(f"COPY sessions ({', '.join(s_cols)}) FROM STDIN") as copy:
            for s, _ in _rows(start, count, tenant):
                copy.write_row(tuple(s.get(c) for c in s_cols))
        with cur.copy(f"COPY session_events ({', '.join(e_cols)}) FROM STDIN") as copy:
            for _, e in _rows(start, count, tenant):
                copy.write_row(tuple(e.get(c) for c in e_cols))
    conn.execute("ANALYZE sessions")  # what autovacuum would do within a minute
    conn.execute("ANALYZE session_events")
