"""Operating the outbox by hand: list rows, retry dead ones, pause and resume a destination.

A retry keeps the row's messageId, so whatever was already received downstream stays deduplicated.
A row that was never sent (dead-lettered at render time, e.g. a missing currency rate) is rendered
again from its transition with the current configuration: nothing of it ever left, so its payload
may still change; a row that was attempted keeps its body byte for byte. Pause and resume write
`destination_state`, which the relay's claim honours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from subledger.core.errors import NotFound, UnknownTarget
from subledger.core.lifecycle import Transition
from subledger.outbox.ingest import IngestPolicy
from subledger.store import identity
from subledger.store import outbox as store
from subledger.store.outbox import OutboxRow

PAUSED_BY_OPERATOR = "paused by operator"


def list_rows(
    conn: psycopg.Connection, *, status: str | None = None, app_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Rows waiting in the outbox, as JSON-ready mappings (the CLI table and `GET /v1/outbox`)."""
    return [_as_dict(row) for row in store.list_rows(conn, status=status, app_id=app_id, limit=limit)]


def _as_dict(row: store.ListedRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__dataclass_fields__}


@dataclass
class Retried:
    requeued: list[str] = field(default_factory=list)
    rerendered: list[str] = field(default_factory=list)
    still_dead: list[tuple[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "requeued": self.requeued,
            "rerendered": self.rerendered,
            "still_dead": [{"message_id": m, "reason": r} for m, r in self.still_dead],
        }


def retry(
    conn: psycopg.Connection, policy: IngestPolicy, now: datetime, *, ref: str | None = None, dead: bool = False
) -> Retried:
    """Make one row (by id or messageId) or every dead row due now; inside the caller's transaction."""
    if ref is None and not dead:
        raise ValueError("name a row or ask for every dead row")
    if ref is None:
        rows = store.lock_for_retry(conn)
    # an outbox id is ASCII digits within bigint ('²' is a digit to str.isdigit); anything else is a messageId
    elif ref.isascii() and ref.isdigit() and int(ref) < 2**63:
        rows = store.lock_for_retry(conn, row_id=int(ref))
    else:
        rows = store.lock_for_retry(conn, message_id=ref)
    if ref is not None and not rows:
        raise NotFound(ref, store.was_delivered(conn, ref))
    result = Retried()
    for row in rows:
        fresh = (_rerender(conn, policy, row.transition, row.destination, row.historical, now)
                 if row.never_sent else None)
        if fresh is not None and fresh.dead_reason:
            store.note_still_dead(conn, row.id, fresh.dead_reason)
            result.still_dead.append((row.message_id, fresh.dead_reason))
            continue
        store.requeue(conn, row.id, policy.due_at(row.app_id, now), None if fresh is None else fresh.body)
        result.requeued.append(row.message_id)
        if fresh is not None:
            result.rerendered.append(row.message_id)
    return result


def _rerender(
    conn: psycopg.Connection,
    policy: IngestPolicy,
    body: dict[str, Any] | None,
    destination: str,
    historical: bool,
    now: datetime,
) -> OutboxRow | None:
    """The row as the current configuration renders it, or None when that is not possible."""
    if body is None:
        return None
    transition = Transition.from_json(body)
    dest = next((d for d in policy.destinations_for(transition.app_id) if d.name == destination), None)
    if dest is None:
        return None
    links = identity.links_for(conn, [(transition.app_id, transition.subscription_key)])
    rows = policy.rows_for(transition, historical=historical, now=now, destinations=(dest,),
                           linked_user=links.get(transition.subscription_key))
    return rows[0] if rows else None


def pause(
    conn: psycopg.Connection, app_id: str, destinations: list[str], now: datetime, reason: str = PAUSED_BY_OPERATOR
) -> list[str]:
    """Manual pause: stays until `resume`, whatever the configuration does."""
    for destination in destinations:
        store.pause_destination(conn, app_id, destination, reason, now, key=None)
    return destinations


def resume(conn: psycopg.Connection, app_id: str, destination: str | None = None) -> list[tuple[str, str]]:
    """Lift pauses and rate-limit waits; returns the destinations that were held."""
    held = store.held_destinations(conn, app_id, destination)
    store.resume_destinations(conn, app_id, destination)
    return [(app_id, d) for d in held]


def known_destinations(conn: psycopg.Connection, policy: IngestPolicy, app_id: str) -> list[str]:
    """The app's configured destinations plus any the database has state or rows for."""
    names = {d.name for d in policy.destinations_for(app_id)}
    return sorted(names | store.stored_destinations(conn, app_id))


def targets(
    conn: psycopg.Connection, policy: IngestPolicy, app_id: str, destination: str | None, *, resuming: bool = False
) -> list[str]:
    """The destinations a pause (or resume) of `app_id` [/ `destination`] applies to; raises UnknownTarget.

    A pause may name what the configuration has or what still has rows in the outbox (a destination
    removed from the config with rows left). A resume may also name anything currently held, so a
    pause made by hand or by an older configuration can always be lifted. Anything else is a typo,
    and storing it would turn `/readyz` "degraded" for a destination that does not exist.
    """
    configured = {d.name for d in policy.destinations_for(app_id)}
    known = configured | store.destinations_with_rows(conn, app_id)
    if resuming:
        known |= set(store.held_destinations(conn, app_id))
    if not known:
        apps = sorted(a for a, dests in policy.destinations.items() if dests)
        hint = f"; configured apps: {', '.join(apps)}" if apps else "; no app has a destination configured"
        raise UnknownTarget(f"app {app_id!r} has no destinations{hint}")
    if destination is None:
        return sorted(known)
    if destination not in known:
        raise UnknownTarget(f"app {app_id!r} has no destination {destination!r}; its destinations: "
                            f"{', '.join(sorted(known))}")
    return [destination]
