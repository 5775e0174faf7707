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


@dataclass(frozen=True, slots=True)
class Entry:
    """A notification ready to append: what the log row will hold."""

    notification: Notification
    raw: bytes
    received_at: datetime
    historical: bool


@dataclass(frozen=True, slots=True)
class Appended:
    position: int
    entry: Entry


@dataclass(frozen=True, slots=True)
class AlreadySeen:
    entry: Entry


def lock_head(conn: psycopg.Connection) -> tuple[int, bytes]:
    row = conn.execute("SELECT position, hash FROM log_head FOR UPDATE").fetchone()
    assert row is not None, "log_head is missing: run `subledger db upgrade`"
    return int(row[0]), bytes(row[1])


def existing_keys(conn: psycopg.Connection, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    if not keys:
        return set()
    rows = conn.execute(
        """
        SELECT l.source, l.external_id FROM event_log l
        JOIN unnest(%s::text[], %s::text[]) AS k(source, external_id)
          ON l.source = k.source AND l.external_id = k.external_id
        """,
        ([k[0] for k in keys], [k[1] for k in keys]),
    ).fetchall()
    return {(r[0], r[1]) for r in rows}


def facts_of(notification: Notification) -> list[dict[str, Any]]:
    return [event.to_facts() for event in notification.events]


def append(conn: psycopg.Connection, entries: Sequence[Entry]) -> list[Appended | AlreadySeen]:
    """Append entries in order inside the caller's transaction; repeats come back as `AlreadySeen`."""
    position, head = lock_head(conn)
    keys = [(e.notification.source.value, e.notification.external_id) for e in entries]
    seen = existing_keys(conn, keys)
    results: list[Appended | AlreadySeen] = []
    rows: list[tuple[Any, ...]] = []
    duplicates: list[tuple[str, str, datetime]] = []
    for key, entry in zip(keys, entries, strict=True):
        if key in seen:
            results.append(AlreadySeen(entry))
            duplicates.append((key[0], key[1], entry.received_at))
            continue
        seen.add(key)
        n = entry.notification
        facts = facts_of(n)
        subscription = n.key()
        received = format_time(entry.received_at)
        head = chain_hash(
            head,
            entry_for_hash(
                source=key[0],
                external_id=key[1],
                app_id=n.app_id,
                subscription_key=subscription or "",
                received_at=received,
                historical=entry.historical,
                raw=entry.raw,
                facts={"kind": n.kind, "events": facts},
            ),
        )
        position += 1
        first = n.events[0] if n.events else None
        rows.append(
            (
                position,
                key[0],
                key[1],
                n.app_id,
                n.kind,
                subscription,
                next((e.app_user_id for e in n.events if e.app_user_id), None),
                first.environment.value if first else None,
                min((e.occurred_at for e in n.events), default=None),
                entry.received_at,
                entry.historical,
                entry.raw,
                orjson.dumps({"kind": n.kind, "events": facts}).decode(),
                head,
            )
        )
        results.append(Appended(position, entry))
    if rows:
        with conn.cursor().copy(
            "COPY event_log (position, source, external_id, app_id, kind, subscription_key, app_user_id,"
            " environment, occurred_at, received_at, historical, raw, facts, hash) FROM STDIN"
        ) as copy:
            copy.set_types(
                ["int8", "text", "text", "text", "text", "text", "text", "text", "timestamptz",
                 "timestamptz", "bool", "bytea", "text", "bytea"]  # jsonb columns take JSON text
            )
            for row in rows:
                copy.write_row(row)
        conn.execute("UPDATE log_head SET position = %s, hash = %s", (position, head))
    if duplicates:
        conn.cursor().executemany(
            "INSERT INTO duplicate_receipts (source, external_id, received_at) VALUES (%s, %s, %s)",
            duplicates,
        )
    return results


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
