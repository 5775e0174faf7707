"""The outbox table family: `outbox`, `outbox_attempts`, `outbox_delivered`, `destination_state`.

Every statement that reads or writes these tables lives here, one function per operation, so the
relay (outbox/relay.py), its lease heartbeat, the operator commands (outbox/ops.py) and the
destination health bookkeeping share one definition of what a row's state means. Callers pass
typed values in and get dataclasses back; no SQL text leaves this module.

Driver errors leave only through the store's door: the connections subledger opens
(`store.db.connect`, `store.db.Pool`) raise its own `StoreError` family, so a caller catches those,
never `psycopg.Error`.

Two sections: the writes that create and withdraw outbox rows (owned by the ingest side) and the
relay/operations side (claim, outcomes, leases, destination state, operator reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.store import rollups
from subledger.store.rows import write_rows

# ---------------------------------------------------------------------------------------------
# Section: outbox rows written by ingest/replay (INSERT, withdraw), the relay's wake-ups and the
# /metrics gauges. Owned by helper "store-core".
# ---------------------------------------------------------------------------------------------

OUTBOX_CHANNEL = "subledger_outbox"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One rendered message for one destination, staged for the outbox (outbox/writer.py builds it).

    A plain value of the store, so a unit of work can hold it without knowing how it was rendered.
    """

    message_id: str
    transition_id: str
    destination: str
    app_id: str
    subscriber: str
    body: list[dict[str, Any]]
    available_at: datetime
    dead_reason: str | None = None

    @property
    def status(self) -> str:
        """A row that could not be rendered whole is kept, dead-lettered with the reason, retryable."""
        return "dead" if self.dead_reason else "pending"

    def values(self, now: datetime) -> tuple[Any, ...]:
        """The row in `COLUMNS` order, its body as JSON text (parsed once by the server)."""
        return (self.message_id, self.transition_id, self.destination, self.app_id, self.subscriber,
                orjson.dumps(self.body).decode(), self.status, self.available_at, self.dead_reason, now)


COLUMNS = ("message_id", "transition_id", "destination", "app_id", "subscriber", "body", "status",
           "available_at", "last_error", "created_at")
TYPES = ("text", "text", "text", "text", "text", "jsonb", "text", "timestamptz", "text", "timestamptz")


def insert(conn: psycopg.Connection, rows: Sequence[OutboxRow], now: datetime, *, copy: bool) -> None:
    """New messages (their transitions are new, so their messageIds are too)."""
    write_rows(conn, "outbox", COLUMNS, TYPES, [r.values(now) for r in rows], copy=copy)


# `insert` as a part of the unit of work's one statement (small batches; see store/log.py's `CTE`).
CTE = ("new_outbox", f"""
  INSERT INTO outbox ({", ".join(COLUMNS)})
  SELECT r.m, r.t, r.d, r.a, r.sb, r.b, r.st, r.av, r.le, (d.j->>'now')::timestamptz
  FROM d, jsonb_to_recordset(d.j->'outbox')
    AS r(m text, t text, d text, a text, sb text, b jsonb, st text, av timestamptz, le text)
""")


def cte_data(rows: Sequence[OutboxRow]) -> dict[str, Any]:
    """The rows as the key `CTE` reads from the statement's JSON parameter."""
    return {"outbox": [
        {"m": r.message_id, "t": r.transition_id, "d": r.destination, "a": r.app_id, "sb": r.subscriber,
         "b": r.body, "st": r.status, "av": r.available_at, "le": r.dead_reason}
        for r in rows
    ]}


INSERT_MISSING_SQL = f"""
INSERT INTO outbox ({", ".join(COLUMNS)})
SELECT %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s
WHERE NOT EXISTS (SELECT 1 FROM outbox_delivered WHERE message_id = %s)
ON CONFLICT (message_id) DO NOTHING
"""


def insert_missing(conn: psycopg.Connection, rows: Sequence[OutboxRow], now: datetime) -> int:
    """Insert rows whose messageId is in neither the outbox nor the delivered record (rule 2: a
    replay, a revival or a repeated link never queues a second message for one fact)."""
    inserted = 0
    for r in rows:
        inserted += conn.execute(INSERT_MISSING_SQL, (*r.values(now), r.message_id)).rowcount
    return inserted


def existing_messages(conn: psycopg.Connection, message_ids: Sequence[str]) -> set[str]:
    """The messageIds already in the outbox or already delivered."""
    if not message_ids:
        return set()
    rows = conn.execute(
        "SELECT message_id FROM outbox WHERE message_id = ANY(%(ids)s)"
        " UNION ALL SELECT message_id FROM outbox_delivered WHERE message_id = ANY(%(ids)s)",
        {"ids": list(message_ids)},
    ).fetchall()
    return {r[0] for r in rows}


def withdraw(conn: psycopg.Connection, transition_ids: Sequence[str], now: datetime) -> int:
    """Rule 3: undelivered messages of superseded transitions leave the outbox (unless in flight)."""
    if not transition_ids:
        return 0
    cur = conn.execute(
        "DELETE FROM outbox WHERE transition_id = ANY(%s) AND (lease_until IS NULL OR lease_until < %s)",
        (list(transition_ids), now),
    )
    return cur.rowcount


def notify(conn: psycopg.Connection) -> None:
    """Wake the relays listening on `OUTBOX_CHANNEL` (delivered when the caller's transaction commits)."""
    conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")


# `notify` as the last part of the unit of work's one statement (store/unit_of_work.WRITE_ALL): the
# wake-up rides in the statement that writes the rows, one round trip fewer per ingest
NOTIFY_IN_CTE = f"SELECT pg_notify('{OUTBOX_CHANNEL}', '') FROM d WHERE d.j ? 'notify'"


def listen(conn: psycopg.Connection) -> None:
    """Subscribe this (autocommit) connection to the outbox's wake-ups."""
    conn.execute(f"LISTEN {OUTBOX_CHANNEL}")


def check_listener(conn: psycopg.Connection) -> None:
    """One round trip on the listening connection: raises when it died, so the listener reconnects."""
    conn.execute("SELECT 1")


# The oldest pending row of one (app, destination): ids grow with creation time and delivered rows
# leave the table, so the primary key's first match is it (the scan stops there).
OLDEST_PENDING_SQL = """
SELECT extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - created_at)::float8 FROM outbox
WHERE status = 'pending' AND app_id = %(app)s AND destination = %(dest)s ORDER BY id LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class Depth:
    """One (app, destination)'s outbox now: `/metrics`, `/readyz` and the console's destinations."""

    pending: int
    dead: int
    oldest_pending_seconds: float | None  # None when nothing is pending


def depths(conn: psycopg.Connection, now: datetime | None = None) -> dict[tuple[str, str], Depth]:
    """(app_id, destination) → its pending and dead rows (the outbox rollup, 0011: a few rows however
    long the backlog, so a scrape or a readiness probe never counts the outbox) and the age of its
    oldest pending row at `now` (the database's clock when None): one index probe per destination
    with a backlog."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for r in rollups.outbox(conn):
        counts.setdefault((str(r["app_id"]), str(r["destination"])), {})[str(r["status"])] = int(r["rows"])
    out = {}
    for (app_id, destination), by in counts.items():
        oldest = None
        if by.get("pending", 0) > 0:
            row = conn.execute(OLDEST_PENDING_SQL, {"now": now, "app": app_id, "dest": destination}).fetchone()
            oldest = None if row is None else float(row[0])
        out[(app_id, destination)] = Depth(by.get("pending", 0), by.get("dead", 0), oldest)
    return out


def paused_flags(conn: psycopg.Connection) -> dict[tuple[str, str], bool]:
    """(app_id, destination) → paused? for every destination with stored state."""
    rows = conn.execute("SELECT app_id, destination, paused FROM destination_state").fetchall()
    return {(str(a), str(d)): bool(paused) for a, d, paused in rows}

# ---------------------------------------------------------------------------------------------
# End of the ingest section.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Section: relay, lease heartbeat, destination state and operator commands. Owned by "relay".
# ---------------------------------------------------------------------------------------------
#
# The relay's rules these statements implement (outbox/relay.py says why):
# - a row is claimable when pending, due, not leased, not behind an earlier pending row of the same
#   (app, destination, subscriber), and its destination is neither paused, waiting out a 429, nor
#   failing (a probe claims from a failing destination, least recently tried first);
# - outcomes other than a 2xx are written only while the lease is ours (`lease_owner`: fencing);
#   a 2xx moves the row to `outbox_delivered` whoever holds it.

RouteKey = tuple[str, str]
"""(app_id, destination)."""


def _arrays(routes: Sequence[RouteKey]) -> tuple[list[str], list[str]]:
    return [a for a, _ in routes], [d for _, d in routes]


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds claimed rows, and until when without a renewal."""

    owner: str
    until: datetime


@dataclass(slots=True)
class ClaimedRow:
    """A leased outbox row: its stored messages as the exact bytes to send.

    A value nobody changes, but not `frozen`: a claim builds up to thousands per pass, and a frozen
    dataclass costs about ten times as much to build (the relay's throughput is benchmarked).
    """

    id: int
    message_id: str
    app_id: str
    destination: str
    subscriber: str
    messages: tuple[bytes, ...]
    message_ids: tuple[str, ...]
    sandbox: bool
    attempts: int
    first_attempt_at: datetime | None
    created_at: datetime


CLAIM_SQL = """
WITH routes(app_id, destination) AS (
  SELECT * FROM unnest(%(apps)s::text[], %(dests)s::text[])
), candidates AS (
  SELECT o.id FROM outbox o
  JOIN routes r ON r.app_id = o.app_id AND r.destination = o.destination
  WHERE o.status = 'pending' AND o.available_at <= %(now)s
    AND (o.lease_until IS NULL OR o.lease_until < %(now)s)
    AND NOT EXISTS (
      SELECT 1 FROM outbox p
      WHERE p.status = 'pending' AND p.app_id = o.app_id AND p.destination = o.destination
        AND p.subscriber = o.subscriber AND p.id < o.id)
    AND NOT EXISTS (
      SELECT 1 FROM destination_state d
      WHERE d.app_id = o.app_id AND d.destination = o.destination
        AND (d.paused OR d.retry_after > %(now)s OR (NOT %(probe)s AND d.failing_since IS NOT NULL)))
  ORDER BY CASE WHEN %(probe)s THEN o.last_attempt_at END NULLS FIRST, o.id
  LIMIT %(limit)s
  FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbox o
SET lease_until = %(lease_until)s, lease_owner = %(owner)s,
    first_attempt_at = coalesce(o.first_attempt_at, %(now)s)
FROM candidates c
WHERE o.id = c.id
RETURNING o.id, o.message_id, o.app_id, o.destination, o.subscriber,
  ARRAY(SELECT e::text FROM jsonb_array_elements(o.body) e),
  ARRAY(SELECT e->>'messageId' FROM jsonb_array_elements(o.body) e),
  coalesce(o.body->0->'context'->>'environment', '') = 'sandbox',
  o.attempts, o.first_attempt_at, o.created_at
"""


def claim(
    conn: psycopg.Connection, routes: Sequence[RouteKey], now: datetime, lease: Lease, limit: int,
    *, probe: bool = False,
) -> list[ClaimedRow]:
    """Lease up to `limit` claimable rows of `routes` (`FOR UPDATE SKIP LOCKED`: relays never wait on
    each other). `probe`: claim from failing destinations instead, least recently tried first, so a
    row whose content makes the endpoint answer 500 cannot keep its destination failing."""
    apps, dests = _arrays(routes)
    fetched = conn.execute(CLAIM_SQL, {
        "apps": apps, "dests": dests, "now": now, "limit": limit, "lease_until": lease.until,
        "owner": lease.owner, "probe": probe,
    }).fetchall()
    return [
        ClaimedRow(
            id=r[0], message_id=r[1], app_id=r[2], destination=r[3], subscriber=r[4],
            messages=tuple(m.encode() for m in r[5]), message_ids=tuple(r[6]), sandbox=bool(r[7]),
            attempts=r[8], first_attempt_at=r[9], created_at=r[10],
        )
        for r in fetched
    ]


def renew_lease(conn: psycopg.Connection, ids: Sequence[int], lease: Lease) -> int:
    """Extend the lease of those of `ids` still held by `lease.owner`; returns how many were renewed.
    Rows are locked in id order, like every other writer of leased rows (no lock-order deadlock)."""
    return conn.execute(
        """
        UPDATE outbox o SET lease_until = %(until)s
        FROM (SELECT id FROM outbox WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s
              ORDER BY id FOR UPDATE) mine
        WHERE o.id = mine.id
        """,
        {"until": lease.until, "ids": list(ids), "owner": lease.owner},
    ).rowcount


def next_due(conn: psycopg.Connection, routes: Sequence[RouteKey]) -> datetime | None:
    """When a pending row of `routes` may next be claimable (a failing destination's: its next
    probe); None when no row of an unpaused destination is pending."""
    apps, dests = _arrays(routes)
    row = conn.execute(
        """
        WITH routes(app_id, destination) AS (SELECT * FROM unnest(%s::text[], %s::text[]))
        SELECT min(greatest(o.available_at, coalesce(o.lease_until, o.available_at),
                            coalesce(d.retry_after, o.available_at),
                            CASE WHEN d.failing_since IS NOT NULL THEN d.probe_at END))
        FROM outbox o JOIN routes r ON r.app_id = o.app_id AND r.destination = o.destination
        LEFT JOIN destination_state d ON d.app_id = o.app_id AND d.destination = o.destination
        WHERE o.status = 'pending' AND NOT coalesce(d.paused, false)
        """,
        (apps, dests),
    ).fetchone()
    return None if row is None else row[0]


# -- outcomes --------------------------------------------------------------------------------------
# One of these per row per batch: plain (not frozen) dataclasses, which cost a tenth as much to build.


@dataclass(slots=True)
class Attempt:
    """One request's result for one message, kept in `outbox_attempts` (the audit timeline reads it)."""

    message_id: str
    attempted_at: datetime
    status_code: int | None
    outcome: str
    response: str


@dataclass(slots=True)
class Tried:
    """A claimed row and the requests it went out in during this claim (added to `attempts`)."""

    id: int
    tries: int


@dataclass(slots=True)
class DeadLetter:
    """A claimed row that will never be sent as it is: dead, until an operator retries it."""

    id: int
    tries: int
    status: int | None
    error: str


@dataclass(slots=True)
class RetryLater:
    """A claimed row to send again at `at`."""

    id: int
    tries: int
    at: datetime
    status: int | None
    error: str


def record_attempts(conn: psycopg.Connection, attempts: Sequence[Attempt]) -> None:
    if not attempts:
        return
    conn.execute(
        """
        INSERT INTO outbox_attempts (message_id, attempted_at, status_code, outcome, response)
        SELECT * FROM unnest(%s::text[], %s::timestamptz[], %s::int[], %s::text[], %s::text[])
        """,
        ([a.message_id for a in attempts], [a.attempted_at for a in attempts],
         [a.status_code for a in attempts], [a.outcome for a in attempts], [a.response for a in attempts]),
    )


def mark_delivered(conn: psycopg.Connection, rows: Sequence[Tried], now: datetime, status: int) -> None:
    """A 2xx is a fact, recorded whoever holds the lease: the rows leave `outbox` for
    `outbox_delivered` in one statement, so the hot table stays small."""
    if not rows:
        return
    conn.execute(
        """
        WITH t(id, tries) AS (SELECT * FROM unnest(%(ids)s::bigint[], %(tries)s::int[])),
        gone AS (
          DELETE FROM outbox o USING t WHERE o.id = t.id
          RETURNING o.*, t.tries
        )
        INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber,
          body, attempts, created_at, first_attempt_at, delivered_at, status_code)
        SELECT message_id, transition_id, destination, app_id, subscriber, body,
          attempts + tries, created_at, first_attempt_at, %(now)s, %(status)s FROM gone
        ON CONFLICT (message_id) DO NOTHING
        """,
        {"ids": [r.id for r in rows], "tries": [r.tries for r in rows], "now": now, "status": status},
    )


def mark_dead(conn: psycopg.Connection, rows: Sequence[DeadLetter], now: datetime, owner: str) -> None:
    """Dead-letter rows this lease holder still holds (another relay's decision is not overwritten)."""
    if not rows:
        return
    conn.execute(
        """
        UPDATE outbox o SET status = 'dead', attempts = o.attempts + t.tries,
          last_attempt_at = %(now)s, last_status = t.status, last_error = t.error,
          lease_until = NULL, lease_owner = NULL
        FROM unnest(%(ids)s::bigint[], %(tries)s::int[], %(statuses)s::int[], %(errors)s::text[])
          AS t(id, tries, status, error)
        WHERE o.id = t.id AND o.lease_owner = %(owner)s
        """,
        {"ids": [r.id for r in rows], "tries": [r.tries for r in rows],
         "statuses": [r.status for r in rows], "errors": [r.error for r in rows], "now": now, "owner": owner},
    )


def schedule_retries(conn: psycopg.Connection, rows: Sequence[RetryLater], now: datetime, owner: str) -> None:
    """Give rows back to be sent again at their `at` (only while the lease is `owner`'s)."""
    if not rows:
        return
    conn.execute(
        """
        UPDATE outbox o SET attempts = o.attempts + t.tries, available_at = t.at,
          last_attempt_at = %(now)s, last_status = t.status, last_error = t.error,
          lease_until = NULL, lease_owner = NULL
        FROM unnest(%(ids)s::bigint[], %(tries)s::int[], %(ats)s::timestamptz[],
                    %(statuses)s::int[], %(errors)s::text[]) AS t(id, tries, at, status, error)
        WHERE o.id = t.id AND o.lease_owner = %(owner)s
        """,
        {"ids": [r.id for r in rows], "tries": [r.tries for r in rows], "ats": [r.at for r in rows],
         "statuses": [r.status for r in rows], "errors": [r.error for r in rows], "now": now, "owner": owner},
    )


def release(conn: psycopg.Connection, rows: Sequence[Tried], owner: str) -> None:
    """Give rows back unsent (or sent, when the destination's failure says nothing about them):
    claimable again at once, their own backoff unchanged."""
    if not rows:
        return
    conn.execute(
        """
        UPDATE outbox o SET attempts = o.attempts + t.tries,
          lease_until = NULL, lease_owner = NULL
        FROM unnest(%s::bigint[], %s::int[]) AS t(id, tries)
        WHERE o.id = t.id AND o.lease_owner = %s
        """,
        ([r.id for r in rows], [r.tries for r in rows], owner),
    )


# -- destination state -----------------------------------------------------------------------------


def hold_destination(conn: psycopg.Connection, app_id: str, destination: str, until: datetime) -> None:
    """The destination asked us to wait (429 Retry-After): nothing of it is claimed before `until`."""
    conn.execute(
        """
        INSERT INTO destination_state (app_id, destination, retry_after) VALUES (%s, %s, %s)
        ON CONFLICT (app_id, destination) DO UPDATE
          SET retry_after = greatest(destination_state.retry_after, EXCLUDED.retry_after)
        """,
        (app_id, destination, until),
    )


@dataclass(frozen=True, slots=True)
class FailingDestination:
    """A destination in an outage, and when it may next be probed (None: now)."""

    app_id: str
    destination: str
    probe_at: datetime | None


def failing_destinations(
    conn: psycopg.Connection, routes: Sequence[RouteKey], now: datetime
) -> list[FailingDestination]:
    """The failing destinations of `routes` that are neither paused nor waiting out a 429."""
    apps, dests = _arrays(routes)
    rows = conn.execute(
        """
        SELECT s.app_id, s.destination, s.probe_at FROM destination_state s
        JOIN unnest(%(apps)s::text[], %(dests)s::text[]) AS r(app_id, destination)
          ON r.app_id = s.app_id AND r.destination = s.destination
        WHERE s.failing_since IS NOT NULL AND NOT s.paused
          AND coalesce(s.retry_after, '-infinity') <= %(now)s
        ORDER BY 1, 2
        """,
        {"apps": apps, "dests": dests, "now": now},
    ).fetchall()
    return [FailingDestination(a, d, p) for a, d, p in rows]


def take_probe_slot(conn: psycopg.Connection, app_id: str, destination: str, now: datetime, until: datetime) -> bool:
    """The probe slot of a failing destination, held until `until`: one relay at a time probes, and
    a killed prober's slot runs out. False: another relay holds it (or the destination recovered)."""
    taken = conn.execute(
        """
        UPDATE destination_state SET probe_at = %(slot)s
        WHERE app_id = %(app)s AND destination = %(dest)s AND failing_since IS NOT NULL
          AND coalesce(probe_at, '-infinity') <= %(now)s
        RETURNING 1
        """,
        {"slot": until, "app": app_id, "dest": destination, "now": now},
    ).fetchone()
    return taken is not None


def set_probe_at(conn: psycopg.Connection, app_id: str, destination: str, at: datetime | None) -> None:
    """When the destination is probed next (also: give back an unused probe slot)."""
    conn.execute(
        "UPDATE destination_state SET probe_at = %s WHERE app_id = %s AND destination = %s",
        (at, app_id, destination),
    )


def record_failure(conn: psycopg.Connection, app_id: str, destination: str, reason: str, now: datetime) -> int:
    """The destination failed a request (5xx, timeout, refused): it is failing from now on, if it was
    not already. Returns its consecutive failed requests (1: this outage has just begun)."""
    row = conn.execute(
        """
        INSERT INTO destination_state (app_id, destination, failing_since, failures, failing_reason)
        VALUES (%(app)s, %(dest)s, %(now)s, 1, %(reason)s)
        ON CONFLICT (app_id, destination) DO UPDATE SET
          failing_since = coalesce(destination_state.failing_since, EXCLUDED.failing_since),
          failures = CASE WHEN destination_state.failing_since IS NULL THEN 1
                          ELSE destination_state.failures + 1 END,
          failing_reason = EXCLUDED.failing_reason
        RETURNING failures
        """,
        {"app": app_id, "dest": destination, "now": now, "reason": reason},
    ).fetchone()
    return int(row[0]) if row else 1


@dataclass(frozen=True, slots=True)
class Recovery:
    """An outage that ended: since when the destination failed, how many requests, the backlog left."""

    failing_since: datetime
    failures: int
    backlog: int


def record_recovery(conn: psycopg.Connection, app_id: str, destination: str, sent: datetime) -> Recovery | None:
    """The destination answered a request sent at `sent`: an outage that began by then is over.
    None when there was none (or it began after `sent`: an older answer says nothing about it)."""
    row = conn.execute(
        """
        UPDATE destination_state s SET failing_since = NULL, failures = 0, failing_reason = NULL,
          probe_at = NULL
        FROM (SELECT app_id, destination, failing_since, failures FROM destination_state
              WHERE app_id = %(app)s AND destination = %(dest)s AND failing_since <= %(sent)s
              FOR UPDATE) old
        WHERE s.app_id = old.app_id AND s.destination = old.destination
        RETURNING old.failing_since, old.failures,
          (SELECT count(*) FROM outbox o
           WHERE o.app_id = %(app)s AND o.destination = %(dest)s AND o.status = 'pending')
        """,
        {"app": app_id, "dest": destination, "sent": sent},
    ).fetchone()
    return None if row is None else Recovery(row[0], int(row[1]), int(row[2]))


def pause_destination(
    conn: psycopg.Connection, app_id: str, destination: str, reason: str, now: datetime, *, key: str | None = None
) -> None:
    """Stop sending to a destination; its rows stay pending. `key`: resume when the config changes
    (a route's fingerprint); None: a manual pause that stays until `resume_destinations`."""
    conn.execute(
        """
        INSERT INTO destination_state (app_id, destination, paused, paused_reason, paused_at, paused_key)
        VALUES (%s, %s, true, %s, %s, %s)
        ON CONFLICT (app_id, destination) DO UPDATE SET paused = true,
          paused_reason = EXCLUDED.paused_reason, paused_at = EXCLUDED.paused_at,
          paused_key = EXCLUDED.paused_key
        """,
        (app_id, destination, reason, now, key),
    )


def resume_destinations(conn: psycopg.Connection, app_id: str, destination: str | None = None) -> list[RouteKey]:
    """Resume one destination of an app, or all of them; also lifts a pending rate-limit wait, and a
    failing destination is probed at once. Returns the (app_id, destination) pairs touched."""
    rows = conn.execute(
        """
        UPDATE destination_state SET paused = false, paused_reason = NULL, paused_at = NULL,
          paused_key = NULL, retry_after = NULL, probe_at = NULL
        WHERE app_id = %s AND (%s::text IS NULL OR destination = %s)
        RETURNING app_id, destination
        """,
        (app_id, destination, destination),
    ).fetchall()
    return [(a, d) for a, d in rows]


def resume_reconfigured(conn: psycopg.Connection, fingerprints: Mapping[RouteKey, str]) -> list[RouteKey]:
    """Resume the destinations paused for a configuration (endpoint, key) that has since changed:
    `fingerprints` are the current ones. A manual pause (no key) stays."""
    keys = sorted(fingerprints)
    apps, dests = _arrays(keys)
    rows = conn.execute(
        """
        UPDATE destination_state s SET paused = false, paused_reason = NULL, paused_at = NULL,
          paused_key = NULL
        FROM unnest(%s::text[], %s::text[], %s::text[]) AS r(app_id, destination, fingerprint)
        WHERE s.app_id = r.app_id AND s.destination = r.destination AND s.paused
          AND s.paused_key IS NOT NULL AND s.paused_key <> r.fingerprint
        RETURNING s.app_id, s.destination
        """,
        (apps, dests, [fingerprints[k] for k in keys]),
    ).fetchall()
    return [(a, d) for a, d in rows]


def held_destinations(conn: psycopg.Connection, app_id: str, destination: str | None = None) -> list[str]:
    """The app's destinations (or just `destination`) that are paused or waiting out a 429."""
    rows = conn.execute(
        "SELECT destination FROM destination_state WHERE app_id = %s"
        " AND (%s::text IS NULL OR destination = %s) AND (paused OR retry_after IS NOT NULL) ORDER BY 1",
        (app_id, destination, destination),
    ).fetchall()
    return [r[0] for r in rows]


def destinations_with_rows(conn: psycopg.Connection, app_id: str) -> set[str]:
    """The app's destinations that have rows in the outbox (pending or dead)."""
    rows = conn.execute("SELECT DISTINCT destination FROM outbox WHERE app_id = %s", (app_id,)).fetchall()
    return {r[0] for r in rows}


def stored_destinations(conn: psycopg.Connection, app_id: str) -> set[str]:
    """The app's destinations the database knows of: with a state or with rows in the outbox."""
    rows = conn.execute(
        "SELECT destination FROM destination_state WHERE app_id = %(a)s"
        " UNION SELECT DISTINCT destination FROM outbox WHERE app_id = %(a)s",
        {"a": app_id},
    ).fetchall()
    return {r[0] for r in rows}


# -- operator commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListedRow:
    """One row of `outbox list`: where it goes, its state, its last try and who holds its lease."""

    id: int
    message_id: str
    transition_id: str
    app_id: str
    destination: str
    subscriber: str
    event: str | None
    status: str
    attempts: int
    available_at: datetime
    last_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    lease_owner: str | None
    lease_until: datetime | None


def list_rows(
    conn: psycopg.Connection, *, status: str | None = None, app_id: str | None = None, limit: int = 100
) -> list[ListedRow]:
    """Rows waiting in the outbox in id order, optionally of one status and one app."""
    rows = conn.execute(
        """
        SELECT id, message_id, transition_id, app_id, destination, subscriber, body->0->>'event' AS event,
          status, attempts, available_at, last_attempt_at, last_status, last_error, created_at, lease_owner,
          lease_until
        FROM outbox
        WHERE (%(status)s::text IS NULL OR status = %(status)s) AND (%(app)s::text IS NULL OR app_id = %(app)s)
        ORDER BY id LIMIT %(limit)s
        """,
        {"status": status, "app": app_id, "limit": limit},
    ).fetchall()
    return [ListedRow(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class RetryCandidate:
    """An outbox row locked for a retry, with its transition (None when the transition is gone)."""

    id: int
    message_id: str
    app_id: str
    destination: str
    attempts: int
    first_attempt_at: datetime | None
    transition: dict[str, Any] | None
    historical: bool

    @property
    def never_sent(self) -> bool:
        """Nothing of it ever left (dead-lettered at render time): its payload may still change."""
        return not self.attempts and self.first_attempt_at is None


def lock_for_retry(
    conn: psycopg.Connection, *, row_id: int | None = None, message_id: str | None = None
) -> list[RetryCandidate]:
    """Lock the row with `row_id`, or with `message_id`, or (neither given) every dead row, in id
    order, inside the caller's transaction."""
    params: dict[str, int | str]
    if row_id is not None:
        where, params = "o.id = %(id)s", {"id": row_id}
    elif message_id is not None:
        where, params = "o.message_id = %(m)s", {"m": message_id}
    else:
        where, params = "o.status = 'dead'", {}
    rows = conn.execute(
        "SELECT o.id, o.message_id, o.app_id, o.destination, o.attempts, o.first_attempt_at, t.body,"
        " t.historical FROM outbox o LEFT JOIN transitions t ON t.id = o.transition_id"
        f" WHERE {where} ORDER BY o.id FOR UPDATE OF o",
        params,
    ).fetchall()
    return [RetryCandidate(i, m, a, d, n, f, body, bool(h)) for i, m, a, d, n, f, body, h in rows]


def was_delivered(conn: psycopg.Connection, message_id: str) -> bool:
    """The message left the outbox with a 2xx (it is in `outbox_delivered`)."""
    row = conn.execute("SELECT 1 FROM outbox_delivered WHERE message_id = %s", (message_id,)).fetchone()
    return row is not None


def note_still_dead(conn: psycopg.Connection, row_id: int, reason: str) -> None:
    """A retried row that still cannot be rendered stays dead with the new reason."""
    conn.execute("UPDATE outbox SET last_error = %s WHERE id = %s", (reason, row_id))


def requeue(
    conn: psycopg.Connection, row_id: int, available_at: datetime, body: Sequence[Mapping[str, Any]] | None = None
) -> None:
    """Make a row pending again at `available_at`, unleased, with the same messageId. `body`: the
    row rendered anew (it was never sent), replacing the stored one and its render error."""
    conn.execute(
        """
        UPDATE outbox SET status = 'pending', available_at = %(now)s, lease_until = NULL, lease_owner = NULL,
          body = coalesce(%(body)s::jsonb, body), last_error = CASE WHEN %(body)s::jsonb IS NULL
            THEN last_error END
        WHERE id = %(id)s
        """,
        {"now": available_at, "id": row_id, "body": None if body is None else orjson.dumps(body).decode()},
    )


# ---------------------------------------------------------------------------------------------
# Section: health reads (`/readyz`, the demo's last line). Owned by "app".
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readiness:
    """What `/readyz` reports: the outbox's backlog, and the destinations not being sent to now."""

    pending: int
    dead: int
    oldest_pending_seconds: float  # 0 when nothing is pending
    paused: list[tuple[str, str, str | None, datetime | None]]  # app_id, destination, reason, since
    rate_limited: list[tuple[str, str, datetime]]  # app_id, destination, until (a 429's Retry-After)
    failing: list[Failing] = field(default_factory=list)  # held behind a probe (5xx, timeouts)


@dataclass(frozen=True, slots=True)
class Failing:
    """A destination the relay marks failing: since when, how many requests failed, the last reason."""

    app_id: str
    destination: str
    since: datetime
    failures: int
    reason: str | None


def failing_states(conn: psycopg.Connection) -> list[Failing]:
    """Every destination in an outage now (`failing_since` set by the relay), paused or not, so
    `/readyz` and `/metrics` show an endpoint that is down before its backlog grows old."""
    rows = conn.execute(
        "SELECT app_id, destination, failing_since, failures, failing_reason FROM destination_state"
        " WHERE failing_since IS NOT NULL ORDER BY 1, 2"
    ).fetchall()
    return [Failing(str(a), str(d), since, int(n), r) for a, d, since, n, r in rows]


def readiness(conn: psycopg.Connection) -> Readiness:
    """The backlog and the held destinations, read now (the database's clock: `now()`)."""
    by_destination = depths(conn).values()
    paused = conn.execute(
        "SELECT app_id, destination, paused_reason, paused_at FROM destination_state WHERE paused"
    ).fetchall()
    waiting = conn.execute(
        "SELECT app_id, destination, retry_after FROM destination_state WHERE retry_after > now()"
    ).fetchall()
    return Readiness(
        pending=sum(d.pending for d in by_destination), dead=sum(d.dead for d in by_destination),
        oldest_pending_seconds=max((d.oldest_pending_seconds or 0.0 for d in by_destination), default=0.0),
        paused=[(a, d, r, t) for a, d, r, t in paused], rate_limited=[(a, d, t) for a, d, t in waiting],
        failing=failing_states(conn),
    )
