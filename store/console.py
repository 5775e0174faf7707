"""Reads the web console (app/console/) needs beyond the audit's: search, the deliveries feed, one message.

Every statement is a point lookup or a bounded range on an index (named next to it), so each page
costs the same on a log of a thousand events or of a million: nothing here reads `event_log` but
by its primary key, its `(source, external_id)` key, `event_log_subscription` or the GIN index of
the store ids its facts name (`event_log_references`), and every count is read from the rollups
(store/rollups.py). The statements are module constants so tests can EXPLAIN exactly what
runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg.rows import dict_row

from subledger.core.events import Source, Store
from subledger.store import audit, rollups
from subledger.store.fact_references import FACT_REFERENCES

# Point lookups, one per thing a search box may hold. Indexes: subscriptions_pkey, outbox's unique
# message_id, outbox_delivered_pkey, transitions_pkey, event_log_source_external_id (every source
# is named, so the unique key's leading column is bound); store ids: event_log_references below.
FIND_KEYS_SQL = "SELECT key FROM subscriptions WHERE key = ANY(%(keys)s) ORDER BY key"
FIND_MESSAGE_SQL = """
SELECT message_id, transition_id, subscriber, 'outbox' AS place FROM outbox WHERE message_id = ANY(%(ids)s)
UNION ALL
SELECT message_id, transition_id, subscriber, 'delivered' FROM outbox_delivered WHERE message_id = ANY(%(ids)s)
"""
FIND_TRANSITION_SQL = "SELECT id, subscriber, subscription_key FROM transitions WHERE id = %(id)s"
FIND_NOTIFICATION_SQL = """
SELECT position, source, external_id, subscription_key, app_user_id FROM event_log
WHERE source = ANY(%(sources)s) AND external_id = %(q)s ORDER BY position LIMIT 20
"""


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: what matched (`kind`), the console path it links to, and a label."""

    kind: str
    path: str
    label: str


def find(conn: psycopg.Connection, q: str, apps: Sequence[str]) -> list[Hit]:
    """Everything `q` can name: a subscriber (app user id, subscription key, `anon:` name), a store's
    subscription id in any configured app, a store's transaction id, a messageId, a transition id or
    a notification id.

    A store's transaction id (or another id a fact names: a later purchase token, a receipt, an
    invoice) resolves to the subscription whose facts name it, through `event_log_references`.
    """
    hits: list[Hit] = []
    keys = audit.resolve(conn, q)
    if keys:
        hits.append(Hit("subscriber", f"subscribers/{q}", f"{q} ({len(keys)} subscription{'s' * (len(keys) != 1)})"))
    candidates = [f"{app}/{store.value}/{q}" for app in apps for store in Store]
    for (key,) in conn.execute(FIND_KEYS_SQL, {"keys": candidates}).fetchall():
        if key not in keys:
            hits.append(Hit("subscription id", f"subscribers/{key}", str(key)))
    message_ids = [q] + ([q[:-2] + ".t", q[:-2] + ".i"] if q.endswith((".t", ".i")) else [])
    for message_id, transition_id, subscriber, place in conn.execute(FIND_MESSAGE_SQL, {"ids": message_ids}):
        if message_id == q:
            hits.append(Hit("messageId", f"messages/{message_id}",
                            f"{message_id} ({place}; {subscriber}; transition {transition_id})"))
    row = conn.execute(FIND_TRANSITION_SQL, {"id": q}).fetchone()
    if row is not None:
        hits.append(Hit("transition", f"explain/{row[0]}", f"{row[0]} ({row[1]})"))
    seen: set[str] = {h.path for h in hits}
    for position, source, key, user in find_reference(conn, q):
        path = f"subscribers/{key}" if key else f"entries/{position}"
        if path not in seen:
            seen.add(path)
            hits.append(Hit("store transaction id", path,
                            f"{source} {q} → {key or 'no subscription'}{f' ({user})' if user else ''}"))
    params = {"sources": [s.value for s in Source], "q": q}
    for position, source, external_id, key, user in conn.execute(FIND_NOTIFICATION_SQL, params):
        hits.append(Hit("notification", f"entries/{position}",
                        f"{source}:{external_id} → {user or key or 'no subscription'} (log #{position})"))
    return hits


# The feed: the newest rows first, each table read along an index in that order and cut at `limit`
# (outbox: its primary key, ids grow with creation time; outbox_delivered: outbox_delivered_at).
FEED_OUTBOX_SQL = """
SELECT id, message_id, transition_id, app_id, destination, subscriber, body->0->>'event' AS event, status,
  attempts, created_at, NULL::timestamptz AS delivered_at, last_attempt_at, last_status, last_error,
  lease_owner, lease_until
FROM outbox
WHERE (%(app)s::text IS NULL OR app_id = %(app)s) AND (%(dest)s::text IS NULL OR destination = %(dest)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
ORDER BY id DESC LIMIT %(limit)s
"""
FEED_DELIVERED_SQL = """
SELECT NULL::bigint AS id, message_id, transition_id, app_id, destination, subscriber,
  body->0->>'event' AS event, 'delivered' AS status, attempts, created_at, delivered_at,
  delivered_at AS last_attempt_at, status_code AS last_status, NULL::text AS last_error,
  NULL::text AS lease_owner, NULL::timestamptz AS lease_until
FROM outbox_delivered
WHERE (%(app)s::text IS NULL OR app_id = %(app)s) AND (%(dest)s::text IS NULL OR destination = %(dest)s)
  AND (%(since)s::timestamptz IS NULL OR delivered_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR delivered_at < %(until)s)
ORDER BY delivered_at DESC LIMIT %(limit)s
"""


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One message in the deliveries feed; `at` is when it last changed (delivered, tried or made)."""

    id: int | None
    message_id: str
    transition_id: str
    app_id: str
    destination: str
    subscriber: str
    event: str | None
    status: str
    attempts: int
    created_at: datetime
    delivered_at: datetime | None
    last_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    lease_owner: str | None
    lease_until: datetime | None

    @property
    def at(self) -> datetime:
        return self.delivered_at or self.last_attempt_at or self.created_at


def feed(
    conn: psycopg.Connection, *, app_id: str | None = None, destination: str | None = None,
    status: str | None = None, since: datetime | None = None, until: datetime | None = None, limit: int = 100,
) -> list[FeedItem]:
    """The newest `limit` messages matching the filters; `status` is pending, dead, delivered or None
    (all). Time bounds apply to creation for waiting rows and to delivery for delivered ones."""
    params: dict[str, Any] = {"app": app_id, "dest": destination, "status": status, "since": since,
                              "until": until, "limit": limit}
    rows: list[dict[str, Any]] = []
    with conn.cursor(row_factory=dict_row) as cur:
        if status != "delivered":
            rows += cur.execute(FEED_OUTBOX_SQL, params).fetchall()
        if status in (None, "delivered"):
            rows += cur.execute(FEED_DELIVERED_SQL, params).fetchall()
    items = [FeedItem(**r) for r in rows]
    items.sort(key=lambda i: i.at, reverse=True)
    return items[:limit]


MESSAGE_SQL = """
SELECT id, message_id, transition_id, app_id, destination, subscriber, status, attempts, created_at,
  available_at, NULL::timestamptz AS delivered_at, first_attempt_at, last_attempt_at, last_status, last_error,
  lease_owner, lease_until, body
FROM outbox WHERE message_id = %(m)s
UNION ALL
SELECT NULL, message_id, transition_id, app_id, destination, subscriber, 'delivered', attempts, created_at,
  NULL, delivered_at, first_attempt_at, NULL, status_code, NULL, NULL, NULL, body
FROM outbox_delivered WHERE message_id = %(m)s
LIMIT 1
"""
MESSAGE_ATTEMPTS_SQL = """
SELECT id, attempted_at, status_code, outcome, response FROM outbox_attempts WHERE message_id = %(m)s ORDER BY id
"""


@dataclass(frozen=True, slots=True)
class Message:
    """One message wherever it is now, with its exact body (the batch entries sent) and every attempt."""

    row: dict[str, Any]
    attempts: list[dict[str, Any]]


def message(conn: psycopg.Connection, message_id: str) -> Message | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(MESSAGE_SQL, {"m": message_id}).fetchone()
        if row is None:
            return None
        attempts = cur.execute(MESSAGE_ATTEMPTS_SQL, {"m": message_id}).fetchall()
    return Message(row, attempts)


# The payload viewer's entry, by primary key: what the audit's explain step reads, and how it
# arrived (the signature result depends on it).
ENTRY_SQL = """
SELECT l.position, l.source, l.external_id, l.app_id, l.kind, l.subscription_key, l.app_user_id, l.environment,
  l.occurred_at, l.received_at, l.historical, l.raw, l.facts, l.hash, l.arrival,
  (SELECT count(*) FROM duplicate_receipts d
    WHERE d.source = l.source AND d.external_id = l.external_id) AS duplicates
FROM event_log l WHERE l.position = %(position)s
"""


def entry(conn: psycopg.Connection, position: int) -> dict[str, Any] | None:
    """One log entry by position (its primary key) with its raw body, facts, hash and arrival: the
    payload viewer (`raw_bytes`: the body exactly as stored, for re-verifying its signature)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(ENTRY_SQL, {"position": position}).fetchone()
    if row is None:
        return None
    raw = bytes(row.pop("raw"))
    row["raw_bytes"] = raw
    row["raw"] = audit.raw_text(raw)
    row["raw_size"] = len(raw)
    row["hash"] = bytes(row["hash"]).hex()
    return row


def paused(conn: psycopg.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    """(app_id, destination) → its pause (reason, since), for the paused destinations (the audit's statement)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(audit.STATS_PAUSED_SQL).fetchall()
    return {(r["app_id"], r["destination"]): r for r in rows}


@dataclass(frozen=True, slots=True)
class Revenue:
    """One UTC day's net revenue of one app in one currency (`charges`: live transitions with a price)."""

    day: date
    app_id: str
    currency: str | None
    amount: Decimal
    charges: int


def revenue_by_day(conn: psycopg.Connection, days: rollups.Days) -> list[Revenue]:
    """Net revenue per (UTC day charged, app, currency) of the live priced transitions, from the
    revenue rollup (0011), which counts transitions per price text: the few distinct prices are
    summed as Decimals here, where one unreadable price is skipped instead of failing the page. A
    refund's price is negative, so the sum is net."""
    sums: dict[tuple[date, str, str | None], tuple[Decimal, int]] = {}
    for day, app, currency, price, n in rollups.revenue(conn, days):
        try:
            amount = Decimal(price)
        except InvalidOperation:
            continue
        if not amount.is_finite():
            continue
        key = (day, app, currency)
        total, charges = sums.get(key, (Decimal(0), 0))
        sums[key] = (total + amount * n, charges + n)
    return [Revenue(day, app, currency, total, charges)
            for (day, app, currency), (total, charges) in sorted(sums.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                                 kv[0][2] or ""))]


# A store's transaction id (Apple transactionId, Google orderId or a later purchase token, a Stripe
# invoice / payment intent / charge, an Amazon receipt): GIN `event_log_references` (0009), whose
# expression this repeats exactly (store/fact_references.py) so the planner matches it.
FIND_REFERENCE_SQL = f"""
SELECT position, source, subscription_key, app_user_id FROM event_log
WHERE {FACT_REFERENCES} @> jsonb_build_array(%(q)s::text)
ORDER BY position DESC LIMIT 20
"""


def find_reference(conn: psycopg.Connection, q: str) -> list[tuple[int, str, str | None, str | None]]:
    """(position, source, subscription key, app user) of the newest log entries whose facts name `q`."""
    rows = conn.execute(FIND_REFERENCE_SQL, {"q": q}).fetchall()
    return [(int(p), str(s), key, user) for p, s, key, user in rows]
