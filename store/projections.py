"""Projections (a cache of the fold) and the transitions table; both rebuildable from the log."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.lifecycle import SubscriptionState, Transition
from subledger.store.rows import write_rows


def save_states(
    conn: psycopg.Connection, states: Iterable[tuple[SubscriptionState, int]], now: datetime
) -> None:
    rows = [
        (
            s.key,
            s.app_id,
            s.app_user_id,
            None if s.status is None else s.status.value,
            s.expires_at,
            orjson.dumps(s.to_json()).decode(),
            position,
            now,
        )
        for s, position in states
    ]
    if not rows:
        return
    conn.cursor().executemany(
        """
        INSERT INTO subscriptions (key, app_id, app_user_id, status, expires_at, state, last_position, updated_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (key) DO UPDATE SET app_user_id = EXCLUDED.app_user_id, status = EXCLUDED.status,
          expires_at = EXCLUDED.expires_at, state = EXCLUDED.state,
          last_position = GREATEST(subscriptions.last_position, EXCLUDED.last_position),
          updated_at = EXCLUDED.updated_at
        """,
        rows,
    )


def existing_transitions(conn: psycopg.Connection, subscription_key: str) -> dict[str, bool]:
    """id → superseded? for everything ever emitted for the subscription."""
    rows = conn.execute(
        "SELECT id, superseded_at IS NOT NULL FROM transitions WHERE subscription_key = %s",
        (subscription_key,),
    ).fetchall()
    return {r[0]: bool(r[1]) for r in rows}


TRANSITION_COLUMNS = ("id", "subscription_key", "kind", "app_id", "subscriber", "occurred_at", "log_position",
                      "historical", "created_at", "body")
TRANSITION_TYPES = ("text", "text", "text", "text", "text", "timestamptz", "int8", "bool", "timestamptz", "jsonb")


def insert_transitions(
    conn: psycopg.Connection, rows: Sequence[tuple[Transition, int, bool]], now: datetime, *, copy: bool
) -> None:
    """Rows of (transition, causing log position, historical). Ids are new by construction."""
    write_rows(
        conn,
        "transitions",
        TRANSITION_COLUMNS,
        TRANSITION_TYPES,
        [
            (t.id, t.subscription_key, t.kind.value, t.app_id, t.subscriber, t.occurred_at, position, historical,
             now, orjson.dumps(t.to_json()).decode())
            for t, position, historical in rows
        ],
        copy=copy,
    )


def request_states(conn: psycopg.Connection, keys: Sequence[str]) -> psycopg.Cursor[Any]:
    """Send the lock of the batch's subscriptions; fetch with `read_states` (pipelining)."""
    cur = conn.cursor()
    cur.execute("SELECT key, state FROM subscriptions WHERE key = ANY(%s) ORDER BY key FOR UPDATE", (list(keys),))
    return cur


def read_states(cur: psycopg.Cursor[Any]) -> dict[str, SubscriptionState]:
    return {key: SubscriptionState.from_json(state) for key, state in cur.fetchall()}


def mark_superseded(conn: psycopg.Connection, ids: Sequence[str], now: datetime) -> None:
    if ids:
        conn.execute("UPDATE transitions SET superseded_at = %s WHERE id = ANY(%s)", (now, list(ids)))


def revive(conn: psycopg.Connection, ids: Sequence[str]) -> list[tuple[Transition, bool]]:
    if not ids:
        return []
    rows = conn.execute(
        "UPDATE transitions SET superseded_at = NULL WHERE id = ANY(%s) RETURNING body, historical",
        (list(ids),),
    ).fetchall()
    return [(Transition.from_json(body), bool(historical)) for body, historical in rows]


def load_state(conn: psycopg.Connection, key: str) -> SubscriptionState | None:
    row = conn.execute("SELECT state FROM subscriptions WHERE key = %s", (key,)).fetchone()
    return None if row is None else SubscriptionState.from_json(row[0])

