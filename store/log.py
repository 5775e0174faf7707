"""The append-only event log: idempotent, hash-chained appends and history reads.

Appenders serialize on the chain head row, which makes positions gapless and equal to commit
order, lets each hash cover the previous one, and turns a concurrent duplicate into a plain
"already there" once the first writer commits.

The one writer of `event_log`, `duplicate_receipts` and `log_head`: `plan` decides the rows,
`write` puts them in by COPY (big batches) and `CTE`/`cte_data` are the same rows as parts of the
unit of work's single statement (small batches, store/unit_of_work.py). Both encodings sit side by
side so they cannot drift; tests/test_unit_of_work.py pins that they write the same rows.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.chain import DEFAULT_ARRIVAL, chain_hash, entry_for_hash
from subledger.core.derive import Located
from subledger.core.events import CanonicalEvent, event_from_facts, format_time
from subledger.core.sources import Notification
from subledger.store.rows import write_rows

COLUMNS = ("position", "source", "external_id", "app_id", "kind", "subscription_key", "app_user_id",
           "environment", "occurred_at", "received_at", "historical", "raw", "facts", "hash", "arrival")
TYPES = ("int8", "text", "text", "text", "text", "text", "text", "text", "timestamptz", "timestamptz", "bool",
         "bytea", "jsonb", "bytea", "text")


@dataclass(frozen=True, slots=True)
class Entry:
    """A notification ready to append: what the log row will hold."""

    notification: Notification
    raw: bytes
    received_at: datetime
    historical: bool
    arrival: str = DEFAULT_ARRIVAL

    @property
    def key(self) -> tuple[str, str]:
        return (self.notification.source.value, self.notification.external_id)


@dataclass(frozen=True, slots=True)
class Appended:
    position: int
    entry: Entry


@dataclass(frozen=True, slots=True)
class AlreadySeen:
    entry: Entry


@dataclass(frozen=True, slots=True)
class Head:
    """The chain head, locked for this transaction, and which of the batch's keys are already stored."""

    position: int
    hash: bytes
    seen: frozenset[tuple[str, str]]


def facts_of(notification: Notification) -> dict[str, Any]:
    return {"kind": notification.kind, "events": [event.to_facts() for event in notification.events]}


@dataclass(slots=True)
class LogWrites:
    """The rows an append adds: log entries, duplicate receipts and the chain's new head."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    duplicates: list[tuple[str, str, datetime]] = field(default_factory=list)
    head: tuple[int, bytes] | None = None

    @property
    def size(self) -> int:
        """How many of the batch's entries this covers (each is a new row or a receipt)."""
        return len(self.rows) + len(self.duplicates)


def plan(entries: Sequence[Entry], head: Head) -> tuple[list[Appended | AlreadySeen], LogWrites]:
    """Chain the entries onto `head`; repeats come back as `AlreadySeen`. Writes nothing."""
    position, chained = head.position, head.hash
    seen = set(head.seen)
    results: list[Appended | AlreadySeen] = []
    rows: list[tuple[Any, ...]] = []
    duplicates: list[tuple[str, str, datetime]] = []
    for entry in entries:
        key = entry.key
        if key in seen:
            results.append(AlreadySeen(entry))
            duplicates.append((key[0], key[1], entry.received_at))
            continue
        seen.add(key)
        n = entry.notification
        facts = facts_of(n)
        subscription = n.key()
        chained = chain_hash(
            chained,
            entry_for_hash(
                source=key[0],
                external_id=key[1],
                app_id=n.app_id,
                subscription_key=subscription or "",
                received_at=format_time(entry.received_at),
                historical=entry.historical,
                raw=entry.raw,
                facts=facts,
                arrival=entry.arrival,
            ),
        )
        position += 1
        first = n.events[0] if n.events else None
        rows.append((
            position, key[0], key[1], n.app_id, n.kind, subscription,
            next((e.app_user_id for e in n.events if e.app_user_id), None),
            first.environment.value if first else None,
            min((e.occurred_at for e in n.events), default=None),
            entry.received_at, entry.historical, entry.raw, orjson.dumps(facts).decode(), chained,
            entry.arrival,
        ))
        results.append(Appended(position, entry))
    return results, LogWrites(rows, duplicates, (position, chained) if rows else None)


def write(conn: psycopg.Connection, writes: LogWrites, *, copy: bool) -> None:
    write_rows(conn, "event_log", COLUMNS, TYPES, writes.rows, copy=copy)
    if writes.head is not None:
        conn.execute("UPDATE log_head SET position = %s, hash = %s", writes.head)
    if writes.duplicates:
        conn.cursor().executemany(
            "INSERT INTO duplicate_receipts (source, external_id, received_at) VALUES (%s, %s, %s)",
            writes.duplicates,
        )


# The same writes as parts of one statement: `WITH d AS (SELECT <json> AS j), name AS (sql), ...`.
CTE = (
    ("new_log", """
  INSERT INTO event_log (position, source, external_id, app_id, kind, subscription_key, app_user_id, environment,
                         occurred_at, received_at, historical, raw, facts, hash, arrival)
  SELECT r.p, r.s, r.e, r.a, r.k, r.sk, r.u, r.env, r.oc, r.rc, r.h, decode(r.raw, 'base64'), r.f,
         decode(r.hs, 'hex'), r.ar
  FROM d, jsonb_to_recordset(d.j->'log') AS r(p int8, s text, e text, a text, k text, sk text, u text, env text,
                                              oc timestamptz, rc timestamptz, h bool, raw text, f jsonb, hs text,
                                              ar text)
"""),
    ("new_head", """
  UPDATE log_head SET position = (d.j->>'head_position')::int8, hash = decode(d.j->>'head_hash', 'hex')
  FROM d WHERE d.j ? 'head_position'
"""),
    ("receipts", """
  INSERT INTO duplicate_receipts (source, external_id, received_at)
  SELECT r.s, r.e, r.rc FROM d, jsonb_to_recordset(d.j->'duplicates') AS r(s text, e text, rc timestamptz)
"""),
)


def cte_data(writes: LogWrites) -> dict[str, Any]:
    """`writes` as the keys `CTE` reads from the statement's JSON parameter."""
    data: dict[str, Any] = {
        "log": [
            {"p": p, "s": s, "e": e, "a": a, "k": k, "sk": sk, "u": u, "env": env, "oc": oc, "rc": rc, "h": h,
             "raw": base64.b64encode(raw).decode(), "f": orjson.Fragment(f), "hs": hs.hex(), "ar": ar}
            for p, s, e, a, k, sk, u, env, oc, rc, h, raw, f, hs, ar in writes.rows
        ],
        "duplicates": [{"s": s, "e": e, "rc": rc} for s, e, rc in writes.duplicates],
    }
    if writes.head is not None:
        data["head_position"] = writes.head[0]
        data["head_hash"] = writes.head[1].hex()
    return data


def lock_head(conn: psycopg.Connection) -> None:
    """Take the lock every appender takes, for a rebuild that must not interleave with an ingest."""
    conn.execute("SELECT position FROM log_head FOR UPDATE")


def contains(conn: psycopg.Connection, source: str, external_id: str) -> bool:
    """Whether the log already holds the entry `(source, external_id)`."""
    found = conn.execute(
        "SELECT 1 FROM event_log WHERE source = %s AND external_id = %s", (source, external_id)
    ).fetchone()
    return found is not None


# A fact with its entry's position and historical flag, as the derive step folds it.
LoggedEvent = Located


def _logged(position: int, historical: bool, facts: dict[str, Any]) -> Iterator[LoggedEvent]:
    for fact in facts["events"]:
        yield LoggedEvent(event_from_facts(fact), int(position), bool(historical))


def history(conn: psycopg.Connection, subscription_key: str) -> list[LoggedEvent]:
    """Every fact of one subscription, as the fold needs them (it sorts them itself): one round
    trip, right for an ingest that re-folds one subscription."""
    rows = conn.execute(
        "SELECT position, historical, facts FROM event_log WHERE subscription_key = %s",
        (subscription_key,),
    ).fetchall()
    return [fact for position, historical, facts in rows for fact in _logged(position, historical, facts)]


NEXT_KEYS_SQL = """
SELECT DISTINCT subscription_key FROM event_log
WHERE subscription_key IS NOT NULL AND subscription_key > %s
ORDER BY subscription_key LIMIT %s
"""
HISTORIES_SQL = """
SELECT subscription_key, position, historical, facts FROM event_log
WHERE subscription_key = ANY(%s) ORDER BY subscription_key, position
"""


def next_keys(conn: psycopg.Connection, after: str, limit: int) -> list[str]:
    """The next `limit` subscription keys of the log after `after`, in key order (keyset paging)."""
    return [r[0] for r in conn.execute(NEXT_KEYS_SQL, (after, limit)).fetchall()]


def histories(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, list[LoggedEvent]]:
    """key → every fact of its log entries, as `history` returns them: a rebuild of the whole log
    (replay) reads hundreds of subscriptions per statement instead of one per round trip."""
    out: dict[str, list[LoggedEvent]] = defaultdict(list)
    for key, position, historical, facts in conn.execute(HISTORIES_SQL, (list(keys),)).fetchall():
        out[key].extend(_logged(position, historical, facts))
    return out


def events_of(entries: Iterable[Appended]) -> Iterable[tuple[CanonicalEvent, Appended]]:
    for appended in entries:
        for event in appended.entry.notification.events:
            yield event, appended
