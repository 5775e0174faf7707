"""Reconciliation's rows: each reconciler's cursor, and what reconciliation recovered.

A cursor is the store time up to which a completed run has read a source's API for one app; the
next run starts there (less an overlap the caller chooses), so it resumes instead of re-listing a
store's whole window. What was recovered is read from the log itself (`arrival`), the one record
that cannot drift from what happened.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

RECONCILIATION = "reconciliation"


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
