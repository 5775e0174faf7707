"""The outbox writer: rendered Segment messages inserted inside the ingest transaction.

A row holds the exact `track` + `identify` bodies of one transition for one destination; the
relay only ever sends what is written here, so a messageId's payload never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.lifecycle import Transition
from subledger.core.render import Destination, MissingRate, render
from subledger.store.rows import write_rows

OUTBOX_CHANNEL = "subledger_outbox"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    message_id: str
    transition_id: str
    destination: str
    app_id: str
    subscriber: str
    body: list[dict[str, Any]]
    available_at: datetime
    dead_reason: str | None = None


def rows_for(
    transition: Transition,
    destinations: Sequence[Destination],
    *,
    historical: bool,
    available_at: datetime,
    aliases: tuple[str, ...] = (),
    linked_user: str | None = None,
) -> list[OutboxRow]:
    """One row per destination that accepts the transition.

    `linked_user`: the app user an identity link attributes the subscription to; the messages go to
    that user and the identify lists every id the subscription was known by (`aliases`).
    """
    if linked_user and linked_user != transition.app_user_id:
        aliases = aliases or _aliases(transition, linked_user)
        transition = replace(transition, app_user_id=linked_user)
    rows: list[OutboxRow] = []
    for dest in destinations:
        if not dest.accepts(transition, historical=historical):
            continue
        dead: str | None = None
        try:
            body = render(transition, dest, aliases=aliases)
        except MissingRate as exc:
            # Nothing is lost: the row is kept, dead-lettered with the reason, retryable.
            dead = f"{exc}; fix the rates table, then `subledger outbox retry`"
            body = render(transition, _without_conversion(dest), aliases=aliases)
        rows.append(
            OutboxRow(
                message_id=body[0]["messageId"],
                transition_id=transition.id,
                destination=dest.name,
                app_id=transition.app_id,
                subscriber=transition.subscriber,
                body=body,
                available_at=available_at,
                dead_reason=dead,
            )
        )
    return rows


def _aliases(transition: Transition, linked_user: str) -> tuple[str, ...]:
    """The ids messages of this subscription carried before the link, then the linked user."""
    ids = [transition.subscriber, transition.app_user_id, linked_user]
    return tuple(dict.fromkeys(i for i in ids if i))


def _without_conversion(dest: Destination) -> Destination:
    return replace(dest, currency=None)


COLUMNS = ("message_id", "transition_id", "destination", "app_id", "subscriber", "body", "status",
           "available_at", "last_error", "created_at")
TYPES = ("text", "text", "text", "text", "text", "jsonb", "text", "timestamptz", "text", "timestamptz")


def insert(conn: psycopg.Connection, rows: Sequence[OutboxRow], now: datetime, *, copy: bool = True) -> None:
    write_rows(
        conn,
        "outbox",
        COLUMNS,
        TYPES,
        [
            (r.message_id, r.transition_id, r.destination, r.app_id, r.subscriber, orjson.dumps(r.body).decode(),
             "dead" if r.dead_reason else "pending", r.available_at, r.dead_reason, now)
            for r in rows
        ],
        copy=copy,
    )


def insert_missing(conn: psycopg.Connection, rows: Sequence[OutboxRow], now: datetime) -> int:
    """Insert rows whose messageId is in neither the outbox nor the delivered record (replays)."""
    inserted = 0
    for r in rows:
        cur = conn.execute(
            """
            INSERT INTO outbox (message_id, transition_id, destination, app_id, subscriber, body, status,
                                available_at, last_error, created_at)
            SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s
            WHERE NOT EXISTS (SELECT 1 FROM outbox_delivered WHERE message_id = %s)
            ON CONFLICT (message_id) DO NOTHING
            """,
            (
                r.message_id, r.transition_id, r.destination, r.app_id, r.subscriber,
                orjson.dumps(r.body).decode(), "dead" if r.dead_reason else "pending",
                r.available_at, r.dead_reason, now, r.message_id,
            ),
        )
        inserted += cur.rowcount
    return inserted


def withdraw(conn: psycopg.Connection, transition_ids: Sequence[str], now: datetime) -> int:
    """Rule 3: undelivered messages of superseded transitions leave the outbox (unless in flight)."""
    if not transition_ids:
        return 0
    cur = conn.execute(
        """
        DELETE FROM outbox WHERE transition_id = ANY(%s)
          AND (lease_until IS NULL OR lease_until < %s)
        """,
        (list(transition_ids), now),
    )
    return cur.rowcount

