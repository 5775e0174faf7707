"""What each `subledger verify` found (table `verify_runs`, 0009), so the console can show the last one.

`store.verify.verify` never writes (it runs in a read-only snapshot); the CLI records its result
afterwards with `record`, in a transaction of its own. The table keeps the newest `KEEP` runs:
it answers "when was the log last proven intact, and was it?", not a full history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from subledger.core.errors import StoreError

KEEP = 100

RECORD_SQL = """
INSERT INTO verify_runs (finished_at, started_at, ok, entries, subscriptions, problem_count, first_bad_position)
VALUES (%(finished_at)s, %(started_at)s, %(ok)s, %(entries)s, %(subscriptions)s, %(problem_count)s, %(first_bad)s)
ON CONFLICT (finished_at) DO UPDATE SET
  started_at = excluded.started_at, ok = excluded.ok, entries = excluded.entries,
  subscriptions = excluded.subscriptions, problem_count = excluded.problem_count,
  first_bad_position = excluded.first_bad_position
"""
TRIM_SQL = """
DELETE FROM verify_runs WHERE finished_at < (
  SELECT finished_at FROM verify_runs ORDER BY finished_at DESC OFFSET %(keep)s LIMIT 1)
"""
# The newest run: the primary key's last entry.
LAST_SQL = """
SELECT finished_at, started_at, ok, entries, subscriptions, problem_count, first_bad_position
FROM verify_runs ORDER BY finished_at DESC LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class VerifyRun:
    finished_at: datetime
    started_at: datetime
    ok: bool
    entries: int
    subscriptions: int
    problem_count: int
    first_bad_position: int | None


def record(conn: psycopg.Connection, run: VerifyRun) -> str | None:
    """Store one result (a second one finishing at the same instant replaces it) and trim to `KEEP`.

    Returns why it could not be stored (say, a role without INSERT on the table), else None: the
    record is a convenience for the console, so failing to write it must not turn a verify that
    proved the log intact into a failure."""
    try:
        with conn.transaction():
            conn.execute(RECORD_SQL, {
                "finished_at": run.finished_at, "started_at": run.started_at, "ok": run.ok, "entries": run.entries,
                "subscriptions": run.subscriptions, "problem_count": run.problem_count,
                "first_bad": run.first_bad_position,
            })
            conn.execute(TRIM_SQL, {"keep": KEEP - 1})
    except (psycopg.Error, StoreError) as exc:  # psycopg's own, or the tree store.db's connection raises
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def last(conn: psycopg.Connection) -> VerifyRun | None:
    """The newest recorded run, or None when verify has never been run against this database."""
    with conn.cursor(row_factory=class_row(VerifyRun)) as cur:
        return cur.execute(LAST_SQL).fetchone()
