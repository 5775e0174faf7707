"""The log and projection reads the Google Play reconciler needs (app/reconcile_google.py).

Which subscriptions the `subscriptionsv2` sweep asks Google about: those the projection says are live
whose period ended a while ago with nothing heard since, oldest first and bounded, so one run's cost
is known. The `subscriptions_due` partial index (live statuses, by `expires_at`) serves the range;
the last entry folded into each state (`last_position`, the log's primary key) says when it was
last heard of, and the subscription's latest fact (`event_log_subscription`) names the purchase
token it now goes by. And which voided orders the log already holds a refund for, whichever way it
arrived, so a voided purchase whose push did arrive is not recovered a second time: a containment
probe per order that the `event_log_references` GIN index (0009) can serve, so on a large log a
run's cost follows the orders listed, not the log's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import psycopg

from subledger.store.fact_references import FACT_REFERENCES

CANDIDATES_SQL = """
SELECT s.key, s.expires_at, s.state, t.token
FROM subscriptions s
JOIN event_log last ON last.position = s.last_position
CROSS JOIN LATERAL (
  SELECT e->'attributes'->>'google_purchase_token' AS token
  FROM event_log l, jsonb_array_elements(l.facts->'events') e
  WHERE l.subscription_key = s.key AND l.source = 'google'
    AND e->'attributes'->>'google_purchase_token' IS NOT NULL
  ORDER BY l.occurred_at DESC, l.position DESC
  LIMIT 1
) t
WHERE s.status IS NOT NULL AND s.status NOT IN ('expired', 'expired_promotional', 'paused')
  AND s.expires_at <= %(ended_before)s AND s.expires_at > %(not_before)s
  AND s.app_id = %(app)s AND s.key LIKE %(prefix)s
  AND last.occurred_at <= s.expires_at
ORDER BY s.expires_at, s.key
LIMIT %(limit)s
"""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live subscription whose period ended: its key, the period end, its state, its latest token."""

    key: str
    expires_at: datetime
    state: dict[str, object]
    token: str


def sweep_candidates(
    conn: psycopg.Connection, app_id: str, prefix: str, *, ended_before: datetime, not_before: datetime, limit: int
) -> list[Candidate]:
    """At most `limit` live subscriptions of `app_id` (keys starting with `prefix`) whose period ended
    in (`not_before`, `ended_before`] and whose last folded fact is no later than that end."""
    if limit <= 0:
        return []
    rows = conn.execute(CANDIDATES_SQL, {
        "app": app_id, "prefix": prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",
        "ended_before": ended_before, "not_before": not_before, "limit": limit,
    }).fetchall()
    return [Candidate(str(k), e, s, str(t)) for k, e, s, t in rows]


# Reads by store id go through `event_log_references` (0009: the ids each entry's facts name): a
# containment probe per id, ORed (a BitmapOr of GIN scans; the planner does not parameterize a GIN
# probe by a join), then the entries' facts are read to keep what was asked.
PROBE = f"{FACT_REFERENCES} @> %s::jsonb"
PROBES_PER_QUERY = 100

REFUNDED_SQL = """
SELECT DISTINCT e->>'transaction_id'
FROM event_log l, jsonb_array_elements(l.facts->'events') e
WHERE ({probes})
  AND l.source = 'google' AND l.app_id = %s
  AND e->>'type' = 'refund' AND e->>'transaction_id' = ANY(%s)
"""

# The first fact naming a token carries the subscription id it was logged under (as
# store.lookups.subscription_for_attribute reads one token; this reads a run's tokens at once).
TOKEN_SUBSCRIPTIONS_SQL = """
SELECT DISTINCT ON (e->'attributes'->>'google_purchase_token')
       e->'attributes'->>'google_purchase_token', e->>'subscription_id'
FROM event_log l, jsonb_array_elements(l.facts->'events') e
WHERE ({probes})
  AND l.source = 'google' AND l.app_id = %s
  AND e->'attributes'->>'google_purchase_token' = ANY(%s) AND e->>'subscription_id' IS NOT NULL
ORDER BY e->'attributes'->>'google_purchase_token', l.position
"""


def _probed(conn: psycopg.Connection, sql: str, app_id: str, ids: list[str]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for at in range(0, len(ids), PROBES_PER_QUERY):
        chunk = ids[at:at + PROBES_PER_QUERY]
        params = [json.dumps([i]) for i in chunk] + [app_id, chunk]
        found = conn.execute(sql.format(probes=" OR ".join([PROBE] * len(chunk))), params).fetchall()
        rows.extend(tuple(str(v) for v in row) for row in found)
    return rows


def refunded_orders(conn: psycopg.Connection, app_id: str, order_ids: list[str]) -> set[str]:
    """Which of `order_ids` a Google fact of `app_id` already refunds (a voided push, a revocation)."""
    return {order for (order,) in _probed(conn, REFUNDED_SQL, app_id, order_ids)}


def token_subscriptions(conn: psycopg.Connection, app_id: str, tokens: list[str]) -> dict[str, str]:
    """Purchase token → the subscription id its first fact was logged under, for the tokens the log knows."""
    return dict((token, subscription) for token, subscription in _probed(conn, TOKEN_SUBSCRIPTIONS_SQL, app_id, tokens))
