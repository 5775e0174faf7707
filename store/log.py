"""The append-only event log: idempotent, hash-chained appends and history reads.

Appenders serialize on the chain head row, which makes positions gapless and equal to commit
order, lets each hash cover the previous one, and turns a concurrent duplicate into a plain
"already there" once the first writer commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.chain import chain_hash, entry_for_hash
from subledger.core.events import CanonicalEvent, event_from_facts, format_time
from subledger.core.sources import Notification
from subledger.store.rows import write_rows

COLUMNS = ("position", "source", "external_id", "app_id", "kind", "subscription_key", "app_user_id",
           "environment", "occurred_at", "received_at", "historical", "raw", "facts", "hash")
TYPES = ("int8", "text", "text", "text", "text", "text", "text", "text", "timestamptz", "timestamptz", "bool",
         "bytea", "jsonb", "bytea")


@dataclass(frozen=True, slots=True)
class Entry:
    """A notification ready to append: what the log row will hold."""

    notification: Notification
    raw: bytes
    received_at: datetime
    historical: bool

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

    rows: list[tuple[Any, ...]]
    duplicates: list[tuple[str, str, datetime]]
    head: tuple[int, bytes] | None


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


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    event: CanonicalEvent
    position: int
    historical: bool


def history(conn: psycopg.Connection, subscription_key: str) -> list[LoggedEvent]:
    """Every fact of one subscription, as the fold needs them (it sorts them itself)."""
    rows = conn.execute(
        "SELECT position, historical, facts FROM event_log WHERE subscription_key = %s",
        (subscription_key,),
    ).fetchall()
    return [
        LoggedEvent(event_from_facts(fact), int(position), bool(historical))
        for position, historical, facts in rows
        for fact in facts["events"]
    ]


def events_of(entries: Iterable[Appended]) -> Iterable[tuple[CanonicalEvent, Appended]]:
    for appended in entries:
        for event in appended.entry.notification.events:
            yield event, appended
