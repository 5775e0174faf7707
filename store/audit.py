"""Audit queries: what happened to a subscriber, why a message exists, whether it was delivered.

Read-only, and the only place the audit's SQL lives: the CLI (`subledger audit ...`) and the HTTP
API (`/v1/audit/...`) both call these functions, so the two always answer the same question the
same way. The statements are module constants so the bench can EXPLAIN exactly what runs.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from subledger.core.events import format_time
from subledger.core.lifecycle import SubscriptionState, Transition, anonymous_key, fold, subscriber_id
from subledger.store import retention, rollups
from subledger.store.log import history

# Every subscription a subscriber name can mean: a subscription key itself, an app user id (as the
# projection, the log, an identity link or a transition knows it), or an `anon:<key>` subscriber.
RESOLVE_SQL = """
SELECT key FROM subscriptions WHERE key = %(who)s OR app_user_id = %(who)s
UNION SELECT subscription_key FROM event_log WHERE app_user_id = %(who)s AND subscription_key IS NOT NULL
UNION (SELECT subscription_key FROM event_log WHERE subscription_key = %(who)s LIMIT 1)
UNION SELECT store_subscription FROM identity_links WHERE app_user_id = %(who)s
UNION SELECT subscription_key FROM transitions WHERE subscriber = %(who)s
"""

ENTRIES_SQL = """
SELECT l.position, l.source, l.external_id, l.app_id, l.kind, l.subscription_key, l.app_user_id,
  l.environment, l.occurred_at, l.received_at, l.historical,
  (SELECT count(*) FROM duplicate_receipts d
    WHERE d.source = l.source AND d.external_id = l.external_id) AS duplicates, l.arrival
FROM event_log l
WHERE l.subscription_key = ANY(%(keys)s)
ORDER BY l.occurred_at, l.position
"""

TRANSITIONS_SQL = """
SELECT id, kind, subscription_key, subscriber, occurred_at, log_position, historical,
  superseded_at, created_at, body->>'event_source' AS event_source, body->>'event_id' AS event_id
FROM transitions
WHERE subscription_key = ANY(%(keys)s)
ORDER BY occurred_at, superseded_at IS NULL, created_at, id
"""

# One row per message (track + identify of one transition for one destination), wherever it is now:
# still in the outbox (pending or dead) or moved to outbox_delivered; with its latest attempt.
DELIVERIES_SQL = """
WITH m AS (
  SELECT o.message_id, o.transition_id, o.destination, o.app_id, o.subscriber, o.body->0->>'event' AS event,
    o.status, o.attempts, o.created_at, o.available_at, NULL::timestamptz AS delivered_at,
    o.last_status, o.last_error, o.lease_owner, o.lease_until
  FROM outbox o WHERE o.transition_id = ANY(%(ids)s)
  UNION ALL
  SELECT d.message_id, d.transition_id, d.destination, d.app_id, d.subscriber, d.body->0->>'event',
    'delivered', d.attempts, d.created_at, NULL, d.delivered_at, d.status_code, NULL, NULL, NULL
  FROM outbox_delivered d WHERE d.transition_id = ANY(%(ids)s)
)
SELECT m.*, a.attempted_at AS last_attempt_at, a.outcome AS last_outcome, a.status_code AS last_attempt_status,
  a.response AS last_response
FROM m LEFT JOIN LATERAL (
  SELECT attempted_at, outcome, status_code, response FROM outbox_attempts x
  WHERE x.message_id = m.message_id ORDER BY x.id DESC LIMIT 1
) a ON true
ORDER BY m.created_at, m.message_id
"""


@dataclass(frozen=True, slots=True)
class LogItem:
    """One log entry; `duplicates` counts the repeat deliveries that were recorded and not re-applied."""

    position: int
    source: str
    external_id: str
    app_id: str
    kind: str
    subscription_key: str | None
    app_user_id: str | None
    environment: str | None
    occurred_at: datetime | None
    received_at: datetime
    historical: bool
    duplicates: int
    arrival: str = "push"  # push, reconciliation or import (core.chain.Arrival)


@dataclass(frozen=True, slots=True)
class TransitionItem:
    id: str
    kind: str
    subscription_key: str
    subscriber: str
    occurred_at: datetime
    log_position: int
    historical: bool
    superseded_at: datetime | None
    created_at: datetime
    event_source: str | None
    event_id: str | None

    @property
    def superseded(self) -> bool:
        return self.superseded_at is not None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message row: `status` is pending, dead or delivered; `attempts` as the relay counted them."""

    message_id: str
    transition_id: str
    destination: str
    app_id: str
    subscriber: str
    event: str | None
    status: str
    attempts: int
    created_at: datetime
    available_at: datetime | None
    delivered_at: datetime | None
    last_status: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    last_outcome: str | None
    last_attempt_status: int | None
    last_response: str | None
    lease_owner: str | None = None
    """The relay (host:pid:random) holding the row right now, and until when; None when not claimed."""
    lease_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Timeline:
    subscriber: str
    subscriptions: list[str]
    entries: list[LogItem]
    transitions: list[TransitionItem]
    deliveries: list[Delivery]
    # table → time before which the prune job removed its detail, for the tables this history reaches
    # into: attempts (outbox_attempts), bodies of delivered messages (outbox_delivered), duplicate counts.
    pruned_before: dict[str, datetime] = field(default_factory=dict)


def resolve(conn: psycopg.Connection, who: str) -> list[str]:
    """The subscription keys `who` names (an app user id, a subscription key or an anon: subscriber)."""
    who_key = anonymous_key(who)
    if who_key is not None:
        rows = conn.execute(RESOLVE_SQL, {"who": who_key}).fetchall()
        rows += conn.execute(RESOLVE_SQL, {"who": who}).fetchall()
    else:
        rows = conn.execute(RESOLVE_SQL, {"who": who}).fetchall()
    return sorted({r[0] for r in rows if r[0] is not None})


def subscribers(conn: psycopg.Connection) -> list[str]:
    """Every subscriber the projections name (its app user, else `anon:<key>`), sorted; each is a
    name `timeline` resolves (the demo prints them all)."""
    rows = conn.execute("SELECT app_user_id, key FROM subscriptions").fetchall()
    return sorted({subscriber_id(user, key) for user, key in rows})


def _rows(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def timeline(conn: psycopg.Connection, who: str) -> Timeline:
    """Every log entry, transition and message of the subscriptions `who` names, in occurrence order."""
    keys = resolve(conn, who)
    if not keys:
        return Timeline(who, [], [], [], [])
    entries = [LogItem(**r) for r in _rows(conn, ENTRIES_SQL, {"keys": keys})]
    transitions = [TransitionItem(**r) for r in _rows(conn, TRANSITIONS_SQL, {"keys": keys})]
    # the identify an identity link sent is filed under `link:<subscription key>` (outbox.identify)
    ids = [t.id for t in transitions] + [f"link:{k}" for k in keys]
    deliveries = [Delivery(**r) for r in _rows(conn, DELIVERIES_SQL, {"ids": ids})]
    order = {tid: n for n, tid in enumerate(ids)}
    deliveries.sort(key=lambda d: (order.get(d.transition_id, len(order)), d.destination))
    return Timeline(who, keys, entries, transitions, deliveries, _pruned_before(conn, entries, deliveries))


def _pruned_before(conn: psycopg.Connection, entries: list[LogItem], deliveries: list[Delivery]) -> dict[str, datetime]:
    """The watermarks that concern this history: a reader must know a missing attempt, body or
    duplicate count was pruned (README "Retention"), not lost."""
    marks = retention.watermarks(conn)
    reaches = {
        retention.ATTEMPTS: [d.created_at for d in deliveries],
        retention.DELIVERED: [d.delivered_at for d in deliveries if d.delivered_at is not None],
        retention.DUPLICATES: [e.received_at for e in entries],
    }
    return {name: marks[name] for name, times in reaches.items()
            if name in marks and any(t < marks[name] for t in times)}


@dataclass(frozen=True, slots=True)
class StateAt:
    """The fold of one subscription's facts that happened at or before `at` (rule 1: the log is the truth)."""

    subscription_key: str
    at: datetime
    events_applied: int
    state: SubscriptionState | None
    transitions: list[Transition]


def state_at(conn: psycopg.Connection, key: str, at: datetime) -> StateAt | None:
    """None when the log holds nothing for `key`; a `None` state when nothing had happened by `at`."""
    logged = history(conn, key)
    if not logged:
        return None
    facts = [h.event for h in logged if h.event.occurred_at <= at]
    if not facts:
        return StateAt(key, at, 0, None, [])
    folded = fold(facts)
    return StateAt(key, at, len(facts), folded.state, list(folded.transitions))


EXPLAIN_TRANSITION_SQL = """
SELECT id, kind, subscription_key, subscriber, occurred_at, log_position, historical, superseded_at,
  created_at, body
FROM transitions WHERE id = %(ref)s
UNION ALL
SELECT t.id, t.kind, t.subscription_key, t.subscriber, t.occurred_at, t.log_position, t.historical,
  t.superseded_at, t.created_at, t.body
FROM transitions t
WHERE t.id = (SELECT transition_id FROM outbox WHERE message_id = %(message)s
              UNION ALL SELECT transition_id FROM outbox_delivered WHERE message_id = %(message)s LIMIT 1)
LIMIT 1
"""

EXPLAIN_ENTRY_SQL = """
SELECT l.position, l.source, l.external_id, l.app_id, l.kind, l.subscription_key, l.app_user_id, l.environment,
  l.occurred_at, l.received_at, l.historical, l.raw, l.facts, l.hash,
  (SELECT count(*) FROM duplicate_receipts d
    WHERE d.source = l.source AND d.external_id = l.external_id) AS duplicates
FROM event_log l WHERE l.position = %(position)s
"""

EXPLAIN_MESSAGES_SQL = """
SELECT message_id, destination, status, attempts, created_at, available_at, NULL::timestamptz AS delivered_at,
  last_status, last_error, body
FROM outbox WHERE transition_id = %(id)s
UNION ALL
SELECT message_id, destination, 'delivered', attempts, created_at, NULL, delivered_at, status_code, NULL, body
FROM outbox_delivered WHERE transition_id = %(id)s
ORDER BY destination
"""

EXPLAIN_ATTEMPTS_SQL = """
SELECT id, message_id, attempted_at, status_code, outcome, response
FROM outbox_attempts WHERE message_id = ANY(%(ids)s) ORDER BY id
"""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Causing log entry → transition → rendered message(s) → attempts, for one transition."""

    transition: dict[str, Any]
    entry: dict[str, Any] | None
    fact: dict[str, Any] | None
    messages: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    superseded: bool = field(default=False)


def explain(conn: psycopg.Connection, ref: str) -> Explanation | None:
    """`ref` is a transition id, or a messageId (`.t` or `.i`) of one of its messages."""
    message = ref
    if ref.endswith(".i"):
        message = ref[:-2] + ".t"
    found = _rows(conn, EXPLAIN_TRANSITION_SQL, {"ref": ref, "message": message})
    if not found:
        return None
    transition = found[0]
    entries = _rows(conn, EXPLAIN_ENTRY_SQL, {"position": transition["log_position"]})
    entry = entries[0] if entries else None
    if entry is not None:
        raw = bytes(entry.pop("raw"))
        text = raw_text(raw)
        if text is not None:
            entry["raw"] = text
        else:
            entry["raw_base64"] = base64.b64encode(raw).decode()
    fact = None
    if entry is not None:
        body = transition["body"]
        fact = next(
            (f for f in entry["facts"].get("events", [])
             if f.get("id") == body.get("event_id") and f.get("source") == body.get("event_source")),
            None,
        )
    messages = _rows(conn, EXPLAIN_MESSAGES_SQL, {"id": transition["id"]})
    ids = [m["message_id"] for m in messages]
    attempts = _rows(conn, EXPLAIN_ATTEMPTS_SQL, {"ids": ids}) if ids else []
    return Explanation(transition, entry, fact, messages, attempts, transition["superseded_at"] is not None)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """`audit events` filters; times bound `occurred_at` (when the fact happened at the store)."""

    app_id: str | None = None
    source: str | None = None
    type: str | None = None
    environment: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    subscriber: str | None = None
    arrival: str | None = None


EVENTS_SQL = """
SELECT position, source, external_id, app_id, kind, subscription_key, app_user_id, environment,
  occurred_at, received_at, historical, arrival, facts, raw, hash
FROM event_log
WHERE (%(app_id)s::text IS NULL OR app_id = %(app_id)s)
  AND (%(source)s::text IS NULL OR source = %(source)s)
  AND (%(type)s::text IS NULL OR kind = %(type)s
       OR facts->'events' @> jsonb_build_array(jsonb_build_object('type', %(type)s::text)))
  AND (%(environment)s::text IS NULL OR environment = %(environment)s)
  AND (%(arrival)s::text IS NULL OR arrival = %(arrival)s)
  AND (%(since)s::timestamptz IS NULL OR occurred_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR occurred_at < %(until)s)
  AND (%(keys)s::text[] IS NULL OR subscription_key = ANY(%(keys)s) OR app_user_id = %(who)s)
ORDER BY position
"""
FETCH_ROWS = 1000


def events(conn: psycopg.Connection, f: EventFilter) -> Iterator[dict[str, Any]]:
    """Matching log entries in log order, through a server-side cursor: memory stays flat at any size.

    Needs a connection not in autocommit mode (a named cursor lives in a transaction).
    """
    keys: list[str] | None = None
    if f.subscriber is not None:
        keys = resolve(conn, f.subscriber)
    params = {
        "app_id": f.app_id, "source": f.source, "type": f.type, "environment": f.environment,
        "since": f.since, "until": f.until, "keys": keys, "who": f.subscriber, "arrival": f.arrival,
    }
    with conn.cursor(name="subledger_audit_events", row_factory=dict_row) as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(EVENTS_SQL, params)
        for row in cur:
            raw = bytes(row.pop("raw"))
            try:
                row["raw"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                row["raw_base64"] = base64.b64encode(raw).decode()
            row["hash"] = bytes(row["hash"]).hex()
            yield row


STATS_LOG_SQL = """
SELECT source, app_id, coalesce(environment, '') AS environment, count(*) AS entries
FROM event_log WHERE received_at >= %(since)s AND received_at < %(until)s
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
STATS_DUPLICATES_SQL = """
SELECT source, count(*) AS duplicates FROM duplicate_receipts
WHERE received_at >= %(since)s AND received_at < %(until)s GROUP BY 1 ORDER BY 1
"""
# Index-only on transitions_created (0003 covers kind, app, source, environment, superseded_at).
STATS_TRANSITIONS_SQL = """
SELECT kind, app_id, event_source AS source, environment,
  count(*) FILTER (WHERE superseded_at IS NULL) AS live, count(*) FILTER (WHERE superseded_at IS NOT NULL) AS superseded
FROM transitions WHERE created_at >= %(since)s AND created_at < %(until)s
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
"""
# The outbox's pending and dead rows now: the rollup the outbox's triggers keep (0011); the outbox
# holds every rendered body and is never counted. Ids grow with creation time, so the oldest
# pending row is the one with the lowest id.
STATS_OUTBOX_SQL = rollups.OUTBOX_SQL
STATS_OLDEST_SQL = """
SELECT extract(epoch FROM %(now)s - created_at)::float8 AS oldest_seconds
FROM outbox WHERE status = 'pending' ORDER BY id LIMIT 1
"""
# Latency over the newest LATENCY_SAMPLE deliveries in range (a backward range of
# outbox_delivered_at, cut there): recent latency at a fixed cost, however many were delivered.
LATENCY_SAMPLE = 10_000
STATS_LATENCY_SQL = f"""
SELECT count(*) AS sampled,
  percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY seconds) AS percentiles,
  max(seconds)::float8 AS max
FROM (SELECT extract(epoch FROM delivered_at - created_at) AS seconds FROM outbox_delivered
      WHERE delivered_at >= %(since)s AND delivered_at < %(until)s ORDER BY delivered_at DESC LIMIT {LATENCY_SAMPLE}) s
"""
STATS_DELIVERED_SQL = """
SELECT count(*) FROM outbox_delivered WHERE delivered_at >= %(since)s AND delivered_at < %(until)s
"""
STATS_PAUSED_SQL = """
SELECT app_id, destination, paused_reason, paused_at FROM destination_state WHERE paused ORDER BY 1, 2
"""
STATS_SQL = (STATS_LOG_SQL, STATS_DUPLICATES_SQL, STATS_TRANSITIONS_SQL, STATS_OUTBOX_SQL, STATS_OLDEST_SQL,
             STATS_LATENCY_SQL, STATS_DELIVERED_SQL, STATS_PAUSED_SQL)
# What a range of whole UTC days runs instead of the counts of the log, transitions and deliveries.
STATS_DAYS_SQL = (rollups.LOG_SQL, STATS_DUPLICATES_SQL, rollups.TRANSITIONS_SQL, STATS_OUTBOX_SQL, STATS_OLDEST_SQL,
                  STATS_LATENCY_SQL, rollups.DELIVERED_SQL, STATS_PAUSED_SQL)


@dataclass(frozen=True, slots=True)
class Stats:
    """Log entries and transitions by received/derived time in [since, until); outbox figures as of now."""

    since: datetime
    until: datetime
    log: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    transitions: list[dict[str, Any]]
    outbox: list[dict[str, Any]]
    pending: int
    dead: int
    oldest_pending_seconds: float | None
    delivered: int
    latency_sample: int  # the newest deliveries in range the latency is of (at most LATENCY_SAMPLE)
    latency_seconds: dict[str, float | None]
    paused: list[dict[str, Any]]
    from_rollups: bool  # whole UTC days: log, transition and delivery counts read from the rollups


def stats(conn: psycopg.Connection, since: datetime, until: datetime, now: datetime) -> Stats:
    """Counts over [since, until). When both bounds are UTC midnights the log, transition and
    delivery counts are the rollups' (a few rows per day, whatever the log's size); otherwise they
    are counted on the tables' time indexes (a cost that grows with the rows in range)."""
    params = {"since": since, "until": until, "now": now}
    outbox = _rows(conn, STATS_OUTBOX_SQL, params)
    latency = _rows(conn, STATS_LATENCY_SQL, params)[0]
    pcts = latency["percentiles"] or [None, None, None]
    oldest = _rows(conn, STATS_OLDEST_SQL, params)
    days = rollups.whole_days(since, until)
    if days is None:
        log = _rows(conn, STATS_LOG_SQL, params)
        transitions = _rows(conn, STATS_TRANSITIONS_SQL, params)
        row = conn.execute(STATS_DELIVERED_SQL, params).fetchone()
        delivered = int(row[0]) if row else 0
    else:
        log, transitions = rollups.log(conn, days), rollups.transitions(conn, days)
        delivered = rollups.delivered(conn, days)
    return Stats(
        since=since,
        until=until,
        log=log,
        duplicates=_rows(conn, STATS_DUPLICATES_SQL, params),
        transitions=transitions,
        outbox=outbox,
        pending=sum(int(r["rows"]) for r in outbox if r["status"] == "pending"),
        dead=sum(int(r["rows"]) for r in outbox if r["status"] == "dead"),
        oldest_pending_seconds=oldest[0]["oldest_seconds"] if oldest else None,
        delivered=delivered,
        latency_sample=int(latency["sampled"]),
        latency_seconds={"p50": pcts[0], "p90": pcts[1], "p99": pcts[2], "max": latency["max"]},
        paused=_rows(conn, STATS_PAUSED_SQL, params),
        from_rollups=days is not None,
    )


def jsonable(value: Any) -> Any:
    """Audit records as JSON-ready data: times as RFC 3339 UTC, bytes as hex, dataclasses as objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, SubscriptionState | Transition):
            return value.to_json()
        out = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, TransitionItem):
            out["superseded"] = value.superseded
        return out
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def raw_text(raw: bytes | memoryview | None) -> str | None:
    """The raw body as text when it is UTF-8 (webhook JSON always is), else None."""
    if raw is None:
        return None
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None

