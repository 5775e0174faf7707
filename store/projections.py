"""Projections (a cache of the fold) and the transitions table; both rebuildable from the log.

The one writer of `subscriptions` and `transitions`. Like store/log.py it writes each table two
ways, side by side: row by row or by COPY (big batches, replays), and as parts of the unit of
work's single statement (`STATES_CTE`, `TRANSITIONS_CTE`; small batches). The upsert's conflict
rule is one constant used by both, so `last_position` only grows whichever path wrote it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.lifecycle import SubscriptionState, Transition
from subledger.store.rows import encoder, write_rows

STATE_COLUMNS = "key, app_id, app_user_id, status, expires_at, state, last_position, updated_at"
# last_position only grows: a replay that rewrites a state never moves it back behind the log.
UPSERT = """
ON CONFLICT (key) DO UPDATE SET app_user_id = EXCLUDED.app_user_id, status = EXCLUDED.status,
  expires_at = EXCLUDED.expires_at, state = EXCLUDED.state,
  last_position = GREATEST(subscriptions.last_position, EXCLUDED.last_position),
  updated_at = EXCLUDED.updated_at
"""


def save_states(
    conn: psycopg.Connection, states: Iterable[tuple[SubscriptionState, int]], now: datetime
) -> None:
    """Upsert each (state, last log position) into the projection."""
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
        f"INSERT INTO subscriptions ({STATE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s) {UPSERT}", rows
    )


def existing_transitions(conn: psycopg.Connection, subscription_key: str) -> dict[str, bool]:
    """id → superseded? for everything ever emitted for the subscription."""
    rows = conn.execute(
        "SELECT id, superseded_at IS NOT NULL FROM transitions WHERE subscription_key = %s",
        (subscription_key,),
    ).fetchall()
    return {r[0]: bool(r[1]) for r in rows}


def stored_states(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, tuple[dict[str, Any], int]]:
    """key → (projection state as stored JSON, last_position), for a bulk rebuild (replay)."""
    rows = conn.execute("SELECT key, state, last_position FROM subscriptions WHERE key = ANY(%s)", (list(keys),))
    return {k: (state, int(last)) for k, state, last in rows.fetchall()}


def emitted(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, dict[str, bool]]:
    """key → {transition id → superseded?}: what `existing_transitions` says, for many keys at once."""
    out: dict[str, dict[str, bool]] = defaultdict(dict)
    rows = conn.execute(
        "SELECT subscription_key, id, superseded_at IS NOT NULL FROM transitions WHERE subscription_key = ANY(%s)",
        (list(keys),),
    )
    for key, tid, gone in rows.fetchall():
        out[key][tid] = bool(gone)
    return out


TRANSITION_COLUMNS = ("id", "subscription_key", "kind", "app_id", "subscriber", "occurred_at", "log_position",
                      "historical", "created_at", "body")
TRANSITION_TYPES = ("text", "text", "text", "text", "text", "timestamptz", "int8", "bool", "timestamptz", "jsonb")


def insert_transitions(
    conn: psycopg.Connection, rows: Sequence[tuple[Transition, int, bool]], now: datetime, *, copy: bool
) -> None:
    """Rows of (transition, causing log position, historical). Ids are new by construction."""
    write_rows(
        conn, "transitions", TRANSITION_COLUMNS, TRANSITION_TYPES,
        [transition_values(t, position, historical, now) for t, position, historical in rows], copy=copy,
    )


def transition_values(transition: Transition, position: int, historical: bool, now: datetime) -> tuple[Any, ...]:
    """One transitions row in `TRANSITION_COLUMNS` order, its body as JSON text."""
    t = transition
    return (t.id, t.subscription_key, t.kind.value, t.app_id, t.subscriber, t.occurred_at, position, historical,
            now, orjson.dumps(t.to_json()).decode())


_encode_transition = encoder(TRANSITION_TYPES)


def encode_transition(transition: Transition, position: int, historical: bool, now: datetime) -> str:
    """`transition_values` as a line of COPY text (a bulk import's workers encode, its writer sends)."""
    return _encode_transition(transition_values(transition, position, historical, now))


def mark_superseded(conn: psycopg.Connection, ids: Sequence[str], now: datetime) -> None:
    """Rule 3: emitted transitions a fresh fold no longer produces; kept, for the audit."""
    if ids:
        conn.execute("UPDATE transitions SET superseded_at = %s WHERE id = ANY(%s)", (now, list(ids)))


def revive(conn: psycopg.Connection, ids: Sequence[str]) -> None:
    """Superseded transitions a fresh fold produces again are live again (same id, same body)."""
    if ids:
        conn.execute("UPDATE transitions SET superseded_at = NULL WHERE id = ANY(%s)", (list(ids),))


def emitted_bodies(conn: psycopg.Connection, ids: Sequence[str]) -> dict[str, tuple[Transition, bool]]:
    """id → (the transition as it was emitted, historical): what a revival re-enqueues, since a
    transition keeps the body it was first emitted with."""
    if not ids:
        return {}
    rows = conn.execute("SELECT id, body, historical FROM transitions WHERE id = ANY(%s)", (list(ids),)).fetchall()
    return {tid: (Transition.from_json(body), bool(historical)) for tid, body, historical in rows}


def load_state(conn: psycopg.Connection, key: str) -> SubscriptionState | None:
    row = conn.execute("SELECT state FROM subscriptions WHERE key = %s", (key,)).fetchone()
    return None if row is None else SubscriptionState.from_json(row[0])


def count(conn: psycopg.Connection) -> int:
    """How many subscriptions the projection holds (a progress bar's total; the log's distinct keys
    would cost a scan)."""
    row = conn.execute("SELECT count(*) FROM subscriptions").fetchone()
    return int(row[0]) if row else 0


DUE_SQL = """
SELECT expires_at, key, state FROM subscriptions
WHERE status IS NOT NULL AND status NOT IN ('expired', 'expired_promotional', 'paused')
  AND expires_at <= %(cutoff)s
  AND (%(after_at)s::timestamptz IS NULL OR (expires_at, key) > (%(after_at)s, %(after_key)s))
ORDER BY expires_at, key LIMIT %(limit)s
"""


def due_states(
    conn: psycopg.Connection, cutoff: datetime, after: tuple[datetime, str] | None, limit: int
) -> list[tuple[datetime, str, SubscriptionState]]:
    """One page of live subscriptions whose period ended before `cutoff`, in (expires_at, key) order
    (keyset paging after `after`); the `subscriptions_due` partial index serves it."""
    rows = conn.execute(
        DUE_SQL,
        {"cutoff": cutoff, "after_at": after[0] if after else None, "after_key": after[1] if after else None,
         "limit": limit},
    ).fetchall()
    return [(r[0], r[1], SubscriptionState.from_json(r[2])) for r in rows]


# The same writes as parts of the unit of work's one statement (see store/log.py's `CTE`).
STATES_CTE = ("states", f"""
  INSERT INTO subscriptions ({STATE_COLUMNS})
  SELECT r.k, r.a, r.u, r.st, r.ex, r.s, r.lp, (d.j->>'now')::timestamptz
  FROM d, jsonb_to_recordset(d.j->'states')
    AS r(k text, a text, u text, st text, ex timestamptz, s jsonb, lp int8)
  {UPSERT}""")
TRANSITIONS_CTE = ("new_transitions", f"""
  INSERT INTO transitions ({", ".join(TRANSITION_COLUMNS)})
  SELECT r.i, r.k, r.kd, r.a, r.sb, r.oc, r.lp, r.h, (d.j->>'now')::timestamptz, r.b
  FROM d, jsonb_to_recordset(d.j->'transitions')
    AS r(i text, k text, kd text, a text, sb text, oc timestamptz, lp int8, h bool, b jsonb)
""")


def _state_item(st: SubscriptionState, position: int) -> dict[str, Any]:
    return {"k": st.key, "a": st.app_id, "u": st.app_user_id, "st": st.status, "ex": st.expires_at,
            "s": st.to_json(), "lp": position}


def cte_data(
    states: Iterable[tuple[SubscriptionState, int]], transitions: Iterable[tuple[Transition, int, bool]]
) -> dict[str, Any]:
    """The rows as the keys `STATES_CTE` and `TRANSITIONS_CTE` read from the statement's JSON."""
    return {
        "states": [_state_item(st, position) for st, position in states],
        "transitions": [
            {"i": t.id, "k": t.subscription_key, "kd": t.kind, "a": t.app_id, "sb": t.subscriber,
             "oc": t.occurred_at, "lp": position, "h": historical, "b": t.to_json()}
            for t, position, historical in transitions
        ],
    }


def encode_state(state: SubscriptionState, position: int) -> bytes:
    """One state as an item of `STATES_CTE`'s JSON (a bulk import's workers encode, its writer sends)."""
    return orjson.dumps(_state_item(state, position))


# `STATES_CTE` on its own, for states encoded by `encode_state`: one statement, one JSON parameter.
SAVE_ENCODED_STATES = f"WITH d AS (SELECT %s::jsonb AS j) {STATES_CTE[1].strip()}"


def save_encoded_states(conn: psycopg.Connection, items: Sequence[bytes], now: datetime) -> None:
    """Upsert states encoded by `encode_state`, under the same conflict rule as `save_states`."""
    if items:
        param = b'{"now":' + orjson.dumps(now) + b',"states":[' + b",".join(items) + b"]}"
        conn.execute(SAVE_ENCODED_STATES, (param.decode(),))
