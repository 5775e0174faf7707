"""The log and projection reads the Google Play reconciler needs (app/reconcile_google.py).

Which subscriptions the `subscriptionsv2` sweep asks Google about: those the projection says are live
whose period ended a while ago with nothing heard since, oldest first and bounded, so one run's cost
is known. The `subscriptions_due` partial index (live statuses, by `expires_at`) serves the range;
the last entry folded into each state (`last_position`, the log's primary key) says when it was
last heard of, and the subscription's latest fact (`event_log_subscription`) names the purchase
token it now goes by. And which voided orders the log already holds a refund for, whichever way it
arrived, so a voided purchase whose push did arrive is not recovered a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

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


REFUNDED_SQL = """
SELECT DISTINCT e->>'transaction_id'
FROM event_log l, jsonb_array_elements(l.facts->'events') e
WHERE l.source = 'google' AND l.app_id = %(app)s
  AND e->>'type' = 'refund' AND e->>'transaction_id' = ANY(%(orders)s)
"""


def refunded_orders(conn: psycopg.Connection, app_id: str, order_ids: list[str]) -> set[str]:
    """Which of `order_ids` a Google fact of `app_id` already refunds (a voided push, a revocation)."""
    if not order_ids:
        return set()
    rows = conn.execute(REFUNDED_SQL, {"app": app_id, "orders": order_ids}).fetchall()
    return {str(r[0]) for r in rows}
