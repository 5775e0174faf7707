"""Retention: the delivery tables are pruned by age, in small batches; the event log never is.

What goes, and why it is safe (README "Retention"):

- `outbox_attempts`: attempts older than the retention are deleted, except the latest attempt of a
  message still in the outbox (pending or dead), which the timeline shows as the reason it waits.
  Nothing decides on attempts: the relay counts them on the outbox row.
- `outbox_delivered`: a delivered message older than the retention loses its rendered body and
  keeps its row (messageId, transition, destination, times, status) as a tombstone. The row is what
  makes `replay` (`store.outbox.existing_messages` / `insert_missing`) skip a messageId that was
  already delivered, so deleting it could send the message a second time. The body is most of the
  row's size, and what it rendered stays: the transition (`audit explain`) and the log's facts.
- `duplicate_receipts`: receipts older than the retention are deleted (through a SECURITY DEFINER
  function, migration 0005: the app role may only add receipts); the audit counts only what is kept.
- `destination_state`: only rows of destinations no longer configured, not paused, whose last
  rate-limit wait ended before the retention. A pause (manual or after a 401/403/404) is never
  pruned: it ends as a pause does (`outbox resume`, or a changed key). A configured destination's
  row is never touched.

Every batch is its own short transaction with a `lock_timeout`, so pruning never holds a lock for
long and never queues behind the relay or an ingest: a batch that cannot have its rows within
the timeout rolls back and ends the run, and the next run picks up where this one stopped. One
pruner runs at a time per database (an advisory lock), whichever processes schedule it. Each
table's `retention_watermarks` row says that nothing older than `pruned_before` is kept; the
audit timeline shows it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from subledger.core.errors import Locked
from subledger.store.db import translate_errors

PRUNE_LOCK = 0x5B1ED6E6  # the migration lock is 0x5B1ED6E5
LOCK_TIMEOUT = "2s"
ATTEMPTS = "outbox_attempts"
DELIVERED = "outbox_delivered"
DUPLICATES = "duplicate_receipts"
DESTINATIONS = "destination_state"

EPOCH = datetime.min.replace(tzinfo=UTC)  # before any row

Halted = Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each table keeps its detail; `batch` rows are removed per transaction."""

    attempts: timedelta = timedelta(days=30)
    delivered: timedelta = timedelta(days=90)
    duplicate_receipts: timedelta = timedelta(days=90)
    destination_state: timedelta = timedelta(days=30)
    batch: int = 1000


@dataclass(slots=True)
class Pruned:
    """Rows removed (or, dry, that would be) per table; `delivered` counts bodies dropped."""

    dry_run: bool = False
    attempts: int = 0
    delivered: int = 0
    duplicate_receipts: int = 0
    destination_state: int = 0
    batches: int = 0
    complete: bool = True
    incomplete: str | None = None  # why a run stopped short: the next run carries on
    cutoffs: dict[str, datetime] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.attempts + self.delivered + self.duplicate_receipts + self.destination_state


# One page of old attempts in (attempted_at, id) order after the last page; the latest attempt of a
# message still in the outbox is passed over (and looked at again next run, once the row has gone).
ATTEMPTS_SQL = """
WITH scan AS (
  SELECT id, message_id, attempted_at FROM outbox_attempts
  WHERE attempted_at < %(cutoff)s AND (attempted_at, id) > (%(after_at)s, %(after_id)s)
  ORDER BY attempted_at, id LIMIT %(batch)s
), old AS (
  SELECT s.id FROM scan s
  WHERE NOT (EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = s.message_id)
             AND NOT EXISTS (SELECT 1 FROM outbox_attempts l WHERE l.message_id = s.message_id AND l.id > s.id))
), gone AS (
  DELETE FROM outbox_attempts a USING old WHERE a.id = old.id RETURNING a.id
), last AS (
  SELECT attempted_at, id FROM scan ORDER BY attempted_at DESC, id DESC LIMIT 1
)
SELECT (SELECT attempted_at FROM last), (SELECT id FROM last), (SELECT count(*) FROM gone)
"""
ATTEMPTS_COUNT_SQL = """
SELECT count(*) FROM outbox_attempts s
WHERE s.attempted_at < %(cutoff)s
  AND NOT (EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = s.message_id)
           AND NOT EXISTS (SELECT 1 FROM outbox_attempts l WHERE l.message_id = s.message_id AND l.id > s.id))
"""

# From the last watermark up, on the delivered_at index: tombstones below it are never read again.
DELIVERED_SQL = """
WITH old AS (
  SELECT message_id, delivered_at FROM outbox_delivered
  WHERE delivered_at >= %(since)s AND delivered_at < %(cutoff)s AND body IS NOT NULL
  ORDER BY delivered_at LIMIT %(batch)s
), done AS (
  UPDATE outbox_delivered d SET body = NULL FROM old
  WHERE d.message_id = old.message_id AND d.body IS NOT NULL RETURNING d.message_id
)
SELECT (SELECT max(delivered_at) FROM old), (SELECT count(*) FROM done)
"""
DELIVERED_COUNT_SQL = """
SELECT count(*) FROM outbox_delivered
WHERE delivered_at >= %(since)s AND delivered_at < %(cutoff)s AND body IS NOT NULL
"""

DUPLICATES_SQL = "SELECT subledger_prune_duplicate_receipts(%(cutoff)s, %(batch)s)"
DUPLICATES_COUNT_SQL = "SELECT count(*) FROM duplicate_receipts WHERE received_at < %(cutoff)s"

_STALE_DESTINATIONS = """
FROM destination_state s
WHERE NOT s.paused AND coalesce(s.retry_after, '-infinity') < %(cutoff)s
  AND NOT EXISTS (SELECT 1 FROM unnest(%(apps)s::text[], %(dests)s::text[]) AS c(app_id, destination)
                  WHERE c.app_id = s.app_id AND c.destination = s.destination)
"""
DESTINATIONS_SQL = f"""
DELETE FROM destination_state WHERE (app_id, destination) IN (
  SELECT s.app_id, s.destination {_STALE_DESTINATIONS} LIMIT %(batch)s)
"""
DESTINATIONS_COUNT_SQL = f"SELECT count(*) {_STALE_DESTINATIONS}"

WATERMARK_SQL = """
INSERT INTO retention_watermarks (name, pruned_before, pruned_at, rows) VALUES (%s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET
  pruned_before = greatest(retention_watermarks.pruned_before, EXCLUDED.pruned_before),
  pruned_at = EXCLUDED.pruned_at, rows = retention_watermarks.rows + EXCLUDED.rows
"""
WATERMARKS_SQL = "SELECT name, pruned_before, rows FROM retention_watermarks"


def watermarks(conn: psycopg.Connection) -> dict[str, datetime]:
    """Table → the time before which its pruned detail is gone (only tables that lost any)."""
    return {name: before for name, before, rows in conn.execute(WATERMARKS_SQL).fetchall() if rows}


def prune(
    conn: psycopg.Connection,
    retention: Retention,
    now: datetime,
    *,
    configured: Collection[tuple[str, str]],
    dry_run: bool = False,
    stop: threading.Event | None = None,
) -> Pruned:
    """Prune every table; `configured` holds the (app, destination) pairs of the configuration.

    `conn` must have no transaction open; each batch commits on its own. With no destination
    configured at all (a run without the configuration), destination state is left alone.
    """
    result = Pruned(dry_run=dry_run, cutoffs={
        ATTEMPTS: now - retention.attempts,
        DELIVERED: now - retention.delivered,
        DUPLICATES: now - retention.duplicate_receipts,
        DESTINATIONS: now - retention.destination_state,
    })
    pairs = sorted(set(configured))
    params = {"apps": [a for a, _ in pairs], "dests": [d for _, d in pairs]}
    if dry_run:
        result.attempts = _count(conn, ATTEMPTS_COUNT_SQL, {"cutoff": result.cutoffs[ATTEMPTS]})
        result.delivered = _count(conn, DELIVERED_COUNT_SQL,
                                  {"cutoff": result.cutoffs[DELIVERED], "since": _since(conn, DELIVERED)})
        result.duplicate_receipts = _count(conn, DUPLICATES_COUNT_SQL, {"cutoff": result.cutoffs[DUPLICATES]})
        if pairs:
            result.destination_state = _count(conn, DESTINATIONS_COUNT_SQL,
                                              {**params, "cutoff": result.cutoffs[DESTINATIONS]})
        conn.commit()
        return result
    if not _try_lock(conn):
        result.complete, result.incomplete = False, "another prune is running on this database"
        return result

    def halted() -> bool:
        return stop is not None and stop.is_set()

    done: dict[str, bool] = {}
    try:
        with translate_errors():  # the caller's connection may be psycopg's own
            done[ATTEMPTS] = _prune_attempts(conn, result, retention.batch, halted)
            done[DELIVERED] = _prune_delivered(conn, result, retention.batch, halted)
            done[DUPLICATES] = _prune_duplicates(conn, result, retention.batch, halted)
            if pairs:
                _prune_destinations(conn, result, retention.batch, params, halted)
    except Locked:
        # A row the relay or an ingest holds: give way (the batch rolled back), go on next run.
        result.incomplete = "a row was locked by another transaction"
    try:
        removed = {ATTEMPTS: result.attempts, DELIVERED: result.delivered, DUPLICATES: result.duplicate_receipts}
        with conn.transaction():
            for name, count in removed.items():
                # "nothing older is kept" holds only after a whole pass; the count always adds up
                finished = done.get(name, False)
                if finished or count:
                    conn.execute(WATERMARK_SQL, (name, result.cutoffs[name] if finished else EPOCH, now, count))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK,))
        conn.commit()
    if result.incomplete is None and (halted() or not all(done.values())):
        result.incomplete = "stopped"
    result.complete = result.incomplete is None
    return result


def _count(conn: psycopg.Connection, sql: str, params: Mapping[str, object]) -> int:
    row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _try_lock(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK,)).fetchone()
    conn.commit()
    return bool(row and row[0])


def _batch(conn: psycopg.Connection, sql: str, params: Mapping[str, object]) -> tuple[Any, ...]:
    """One statement in its own transaction, giving up rather than waiting long on a row lock."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cur = conn.execute(sql, params)
        row = cur.fetchone() if cur.description else None
        return tuple(row) if row is not None else (cur.rowcount,)


def _since(conn: psycopg.Connection, name: str) -> datetime:
    """Where the last whole pass stopped: nothing below it is read again."""
    row = conn.execute("SELECT pruned_before FROM retention_watermarks WHERE name = %s", (name,)).fetchone()
    conn.commit()
    return row[0] if row else EPOCH


def _prune_attempts(conn: psycopg.Connection, result: Pruned, batch: int, halted: Halted) -> bool:
    after: tuple[datetime, int] = (EPOCH, 0)
    while not halted():
        last_at, last_id, gone = _batch(conn, ATTEMPTS_SQL, {
            "after_at": after[0], "after_id": after[1], "batch": batch, "cutoff": result.cutoffs[ATTEMPTS]})
        result.batches += 1
        result.attempts += gone
        if last_at is None:
            return True
        after = (last_at, last_id)
    return False


def _prune_delivered(conn: psycopg.Connection, result: Pruned, batch: int, halted: Halted) -> bool:
    since = _since(conn, DELIVERED)
    while not halted():
        last, done = _batch(conn, DELIVERED_SQL,
                            {"since": since, "batch": batch, "cutoff": result.cutoffs[DELIVERED]})
        result.batches += 1
        result.delivered += done
        if last is None:
            return True
        since = last
    return False


def _prune_duplicates(conn: psycopg.Connection, result: Pruned, batch: int, halted: Halted) -> bool:
    while not halted():
        (gone,) = _batch(conn, DUPLICATES_SQL, {"cutoff": result.cutoffs[DUPLICATES], "batch": batch})
        result.batches += 1
        result.duplicate_receipts += gone
        if gone < batch:
            return True
    return False


def _prune_destinations(
    conn: psycopg.Connection, result: Pruned, batch: int, params: Mapping[str, object], halted: Halted
) -> None:
    while not halted():
        (gone,) = _batch(conn, DESTINATIONS_SQL, {**params, "batch": batch, "cutoff": result.cutoffs[DESTINATIONS]})
        result.batches += 1
        result.destination_state += gone
        if gone < batch:
            return
