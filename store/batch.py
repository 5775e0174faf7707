"""An ingest transaction in as few statements as possible.

`begin` is one statement (the `subledger_ingest_begin` function): it locks the chain head, finds
which keys are already logged, locks the batch's subscription states and reads identity links.
`write_all` is one statement: a chain of data-modifying CTEs. A webhook's ingest is then BEGIN,
two statements and COMMIT. Each statement takes one JSON parameter, which costs the client one
`orjson.dumps` instead of adapting dozens of arrays (that adaptation cost more than the inserts).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.lifecycle import SubscriptionState, Transition
from subledger.store import log
from subledger.store.outbox import OutboxRow


@dataclass(frozen=True, slots=True)
class Begun:
    head: log.Head
    states: dict[str, SubscriptionState]
    links: dict[str, str]


def begin(
    conn: psycopg.Connection,
    entries: Sequence[log.Entry],
    keys: Sequence[str],
    link_pairs: Iterable[tuple[str, str]],
) -> Begun:
    param = {
        "entries": [{"source": e.key[0], "external_id": e.key[1]} for e in entries],
        "keys": list(keys),
        "links": [{"app_id": app_id, "store_subscription": key} for app_id, key in link_pairs],
    }
    row = conn.execute("SELECT * FROM subledger_ingest_begin(%s::jsonb)", (orjson.dumps(param).decode(),)).fetchone()
    assert row is not None, "run `subledger db upgrade`"
    position, hash_, seen, states, links = row
    return Begun(
        head=log.Head(int(position), bytes(hash_), frozenset(tuple(k.split("\x1f", 1)) for k in seen)),  # type: ignore[misc]
        states={key: SubscriptionState.from_json(state) for key, state in states.items()},
        links=dict(links),
    )


WRITE_ALL = """
WITH d AS (SELECT %s::jsonb AS j),
new_log AS (
  INSERT INTO event_log (position, source, external_id, app_id, kind, subscription_key, app_user_id, environment,
                         occurred_at, received_at, historical, raw, facts, hash)
  SELECT r.p, r.s, r.e, r.a, r.k, r.sk, r.u, r.env, r.oc, r.rc, r.h, decode(r.raw, 'base64'), r.f,
         decode(r.hs, 'hex')
  FROM d, jsonb_to_recordset(d.j->'log') AS r(p int8, s text, e text, a text, k text, sk text, u text, env text,
                                              oc timestamptz, rc timestamptz, h bool, raw text, f jsonb, hs text)
), new_head AS (
  UPDATE log_head SET position = (d.j->>'head_position')::int8, hash = decode(d.j->>'head_hash', 'hex')
  FROM d WHERE d.j ? 'head_position'
), receipts AS (
  INSERT INTO duplicate_receipts (source, external_id, received_at)
  SELECT r.s, r.e, r.rc FROM d, jsonb_to_recordset(d.j->'duplicates') AS r(s text, e text, rc timestamptz)
), states AS (
  INSERT INTO subscriptions (key, app_id, app_user_id, status, expires_at, state, last_position, updated_at)
  SELECT r.k, r.a, r.u, r.st, r.ex, r.s, r.lp, (d.j->>'now')::timestamptz
  FROM d, jsonb_to_recordset(d.j->'states')
    AS r(k text, a text, u text, st text, ex timestamptz, s jsonb, lp int8)
  ON CONFLICT (key) DO UPDATE SET app_user_id = EXCLUDED.app_user_id, status = EXCLUDED.status,
    expires_at = EXCLUDED.expires_at, state = EXCLUDED.state,
    last_position = GREATEST(subscriptions.last_position, EXCLUDED.last_position),
    updated_at = EXCLUDED.updated_at
), new_transitions AS (
  INSERT INTO transitions (id, subscription_key, kind, app_id, subscriber, occurred_at, log_position, historical,
                           created_at, body)
  SELECT r.i, r.k, r.kd, r.a, r.sb, r.oc, r.lp, r.h, (d.j->>'now')::timestamptz, r.b
  FROM d, jsonb_to_recordset(d.j->'transitions')
    AS r(i text, k text, kd text, a text, sb text, oc timestamptz, lp int8, h bool, b jsonb)
), new_outbox AS (
  INSERT INTO outbox (message_id, transition_id, destination, app_id, subscriber, body, status, available_at,
                      last_error, created_at)
  SELECT r.m, r.t, r.d, r.a, r.sb, r.b, r.st, r.av, r.le, (d.j->>'now')::timestamptz
  FROM d, jsonb_to_recordset(d.j->'outbox')
    AS r(m text, t text, d text, a text, sb text, b jsonb, st text, av timestamptz, le text)
)
SELECT 1
"""


def write_all(
    conn: psycopg.Connection,
    log_writes: log.LogWrites,
    states: Iterable[tuple[SubscriptionState, int]],
    transitions: Sequence[tuple[Transition, int, bool]],
    outbox_rows: Sequence[OutboxRow],
    now: datetime,
) -> None:
    """Everything in one statement with one JSON parameter: one cheap dump for the client, one parse
    for the server (a statement with fifty array parameters costs the client more than the insert)."""
    data: dict[str, Any] = {
        "now": now,
        "log": [
            {"p": p, "s": s, "e": e, "a": a, "k": k, "sk": sk, "u": u, "env": env, "oc": oc, "rc": rc, "h": h,
             "raw": base64.b64encode(raw).decode(), "f": orjson.Fragment(f), "hs": hs.hex()}
            for p, s, e, a, k, sk, u, env, oc, rc, h, raw, f, hs in log_writes.rows
        ],
        "duplicates": [{"s": s, "e": e, "rc": rc} for s, e, rc in log_writes.duplicates],
        "states": [
            {"k": st.key, "a": st.app_id, "u": st.app_user_id, "st": st.status, "ex": st.expires_at,
             "s": st.to_json(), "lp": position}
            for st, position in states
        ],
        "transitions": [
            {"i": t.id, "k": t.subscription_key, "kd": t.kind, "a": t.app_id, "sb": t.subscriber,
             "oc": t.occurred_at, "lp": position, "h": historical, "b": t.to_json()}
            for t, position, historical in transitions
        ],
        "outbox": [
            {"m": r.message_id, "t": r.transition_id, "d": r.destination, "a": r.app_id, "sb": r.subscriber,
             "b": r.body, "st": r.status, "av": r.available_at, "le": r.dead_reason}
            for r in outbox_rows
        ],
    }
    if log_writes.head is not None:
        data["head_position"] = log_writes.head[0]
        data["head_hash"] = log_writes.head[1].hex()
    conn.execute(WRITE_ALL, (orjson.dumps(data).decode(),))
