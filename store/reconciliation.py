"""Reconciliation's rows: each reconciler's cursor, and what reconciliation recovered.

A cursor is the store time up to which a completed run has read a source's API for one app; the
next run starts there (less an overlap the caller chooses), so it resumes instead of re-listing a
store's whole window. Its `source` column names the store and the run mode ("stripe/failures",
"stripe/all": app/reconcile.py's `cursor_name`), so the frequent and the daily run each resume
from their own last complete read. What was recovered is read from the log itself (`arrival`),
the one record that cannot drift from what happened; the counts use the partial index
`event_log_not_pushed` (0008), which holds only the entries that did not arrive by push.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import psycopg

RECONCILIATION = "reconciliation"
# The gap report's window: /readyz and `reconcile status` count what the last 24 h recovered.
GAP_WINDOW: Final = timedelta(hours=24)


@dataclass(frozen=True)
class Cursor:
    """One cursor row: `name` is the store and mode ("stripe/failures"), as in the table's `source`."""

    name: str
    app_id: str
    read_until: datetime
    updated_at: datetime


def cursor(conn: psycopg.Connection, source: str, app_id: str) -> datetime | None:
    """Where the last completed run for (`source`, `app_id`) read up to; None before the first."""
    row = conn.execute(
        "SELECT read_until FROM reconciliation_cursors WHERE source = %s AND app_id = %s", (source, app_id)
    ).fetchone()
    return None if row is None else row[0]


def advance(conn: psycopg.Connection, source: str, app_id: str, read_until: datetime, now: datetime) -> None:
    """Record a completed run; a cursor never moves back (an older `--since` run leaves it)."""
    conn.execute(
        """
        INSERT INTO reconciliation_cursors (source, app_id, read_until, updated_at) VALUES (%s, %s, %s, %s)
        ON CONFLICT (source, app_id) DO UPDATE
          SET read_until = greatest(reconciliation_cursors.read_until, excluded.read_until),
              updated_at = excluded.updated_at
        """,
        (source, app_id, read_until, now),
    )


def cursor_of(conn: psycopg.Connection, name: str, app_id: str) -> Cursor | None:
    """The whole cursor row (when it last advanced, too); None before the first complete run."""
    row = conn.execute(
        "SELECT source, app_id, read_until, updated_at FROM reconciliation_cursors WHERE source = %s AND app_id = %s",
        (name, app_id),
    ).fetchone()
    return None if row is None else Cursor(str(row[0]), str(row[1]), row[2], row[3])


def cursors(conn: psycopg.Connection) -> list[Cursor]:
    """Every cursor, by name and app (a handful of rows: one per store, mode and app)."""
    rows = conn.execute(
        "SELECT source, app_id, read_until, updated_at FROM reconciliation_cursors ORDER BY source, app_id"
    ).fetchall()
    return [Cursor(str(s), str(a), r, u) for s, a, r, u in rows]


def try_lock(conn: psycopg.Connection, name: str, app_id: str) -> bool:
    """Take the session lock of one run (cursor `name`, app) if free: two processes that both schedule
    reconciliation (`serve` and `relay`) never read the same API window at once. Held across the
    run's commits; `unlock` (or the connection's end) frees it."""
    row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (_lock_key(name, app_id),)).fetchone()
    conn.commit()
    return bool(row and row[0])


def unlock(conn: psycopg.Connection, name: str, app_id: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (_lock_key(name, app_id),))
    conn.commit()


def _lock_key(name: str, app_id: str) -> str:
    return f"subledger reconcile {name} {app_id}"


RECOVERED_SINCE_SQL: Final = (
    "SELECT app_id, source, count(*) FROM event_log WHERE arrival = %s AND arrival <> 'push' "
    "AND received_at >= %s GROUP BY app_id, source"
)


def recovered_since(conn: psycopg.Connection, since: datetime) -> dict[tuple[str, str], int]:
    """(app_id, source) → how many log entries reconciliation recovered (received) at or after `since`.

    The gap report's recent half (/readyz, `reconcile status`, the console): `recovered_since(conn,
    now - GAP_WINDOW)`. Read on the partial index `event_log_not_pushed`, so its cost follows the
    entries push never delivered, never the size of the log (tests/test_reconcile_schedule.py
    EXPLAINs it).
    """
    rows = conn.execute(RECOVERED_SINCE_SQL, (RECONCILIATION, since)).fetchall()
    return {(str(a), str(s)): int(n) for a, s, n in rows}


def recovered_counts(conn: psycopg.Connection) -> dict[tuple[str, str], int]:
    """(app_id, source) → how many log entries reconciliation recovered (the partial index)."""
    rows = conn.execute(
        "SELECT app_id, source, count(*) FROM event_log WHERE arrival = %s AND arrival <> 'push' "
        "GROUP BY app_id, source",
        (RECONCILIATION,),
    ).fetchall()
    return {(str(a), str(s)): int(n) for a, s, n in rows}


def logged(conn: psycopg.Connection, source: str, external_ids: list[str]) -> set[str]:
    """Which of `external_ids` the log already holds for `source` (one query, on the unique key)."""
    if not external_ids:
        return set()
    rows = conn.execute(
        "SELECT external_id FROM event_log WHERE source = %s AND external_id = ANY(%s)", (source, external_ids)
    ).fetchall()
    return {str(r[0]) for r in rows}
