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

import orjson
import psycopg
from psycopg.rows import dict_row

from subledger.core.errors import NotFound, UnknownTarget
from subledger.core.lifecycle import Transition
from subledger.outbox import relay, writer
from subledger.outbox.ingest import IngestPolicy
from subledger.store import identity

LIST_SQL = """
SELECT id, message_id, transition_id, app_id, destination, subscriber, body->0->>'event' AS event, status,
  attempts, available_at, last_attempt_at, last_status, last_error, created_at, lease_owner, lease_until
FROM outbox
WHERE (%(status)s::text IS NULL OR status = %(status)s) AND (%(app)s::text IS NULL OR app_id = %(app)s)
ORDER BY id LIMIT %(limit)s
"""

PAUSED_BY_OPERATOR = "paused by operator"


def list_rows(
    conn: psycopg.Connection, *, status: str | None = None, app_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(LIST_SQL, {"status": status, "app": app_id, "limit": limit})
        return cur.fetchall()


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
    if ref is not None:
        # an outbox id is ASCII digits within bigint ('²' is a digit to str.isdigit); anything else is a messageId
        is_id = ref.isascii() and ref.isdigit() and int(ref) < 2**63
        where, params = ("o.id = %(id)s", {"id": int(ref)}) if is_id else ("o.message_id = %(m)s", {"m": ref})
    else:
        where, params = "o.status = 'dead'", {}
    rows = conn.execute(
        f"SELECT o.id, o.message_id, o.app_id, o.destination, o.attempts, o.first_attempt_at, t.body, t.historical"
        f" FROM outbox o LEFT JOIN transitions t ON t.id = o.transition_id WHERE {where}"
        " ORDER BY o.id FOR UPDATE OF o",
        params,
    ).fetchall()
    if ref is not None and not rows:
        delivered = conn.execute("SELECT 1 FROM outbox_delivered WHERE message_id = %s", (ref,)).fetchone()
        raise NotFound(ref, delivered is not None)
    result = Retried()
    for row_id, message_id, app_id, destination, attempts, first_attempt, body, historical in rows:
        never_sent = not attempts and first_attempt is None
        fresh = _rerender(conn, policy, body, destination, bool(historical), now) if never_sent else None
        if fresh is not None and fresh.dead_reason:
            conn.execute("UPDATE outbox SET last_error = %s WHERE id = %s", (fresh.dead_reason, row_id))
            result.still_dead.append((message_id, fresh.dead_reason))
            continue
        conn.execute(
            """
            UPDATE outbox SET status = 'pending', available_at = %(now)s, lease_until = NULL, lease_owner = NULL,
              body = coalesce(%(body)s::jsonb, body), last_error = CASE WHEN %(body)s::jsonb IS NULL
                THEN last_error END
            WHERE id = %(id)s
            """,
            {"now": policy.due_at(app_id, now), "id": row_id,
             "body": None if fresh is None else orjson.dumps(fresh.body).decode()},
        )
        result.requeued.append(message_id)
        if fresh is not None:
            result.rerendered.append(message_id)
    return result


def _rerender(
    conn: psycopg.Connection,
    policy: IngestPolicy,
    body: dict[str, Any] | None,
    destination: str,
    historical: bool,
    now: datetime,
) -> writer.OutboxRow | None:
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
        relay.pause(conn, app_id, destination, reason, now, key=None)
    return destinations


def resume(conn: psycopg.Connection, app_id: str, destination: str | None = None) -> list[tuple[str, str]]:
    """Lift pauses and rate-limit waits; returns the destinations that were held."""
    held = conn.execute(
        "SELECT app_id, destination FROM destination_state WHERE app_id = %s"
        " AND (%s::text IS NULL OR destination = %s) AND (paused OR retry_after IS NOT NULL) ORDER BY 2",
        (app_id, destination, destination),
    ).fetchall()
    relay.resume(conn, app_id, destination)
    return [(a, d) for a, d in held]


def known_destinations(conn: psycopg.Connection, policy: IngestPolicy, app_id: str) -> list[str]:
    """The app's configured destinations plus any the database has state or rows for."""
    names = {d.name for d in policy.destinations_for(app_id)}
    rows = conn.execute(
        "SELECT destination FROM destination_state WHERE app_id = %(a)s"
        " UNION SELECT DISTINCT destination FROM outbox WHERE app_id = %(a)s",
        {"a": app_id},
    ).fetchall()
    names.update(r[0] for r in rows)
    return sorted(names)


def _held_destinations(conn: psycopg.Connection, app_id: str) -> set[str]:
    rows = conn.execute(
        "SELECT destination FROM destination_state WHERE app_id = %s AND (paused OR retry_after IS NOT NULL)",
        (app_id,),
    ).fetchall()
    return {r[0] for r in rows}


def _pending_destinations(conn: psycopg.Connection, app_id: str) -> set[str]:
    rows = conn.execute("SELECT DISTINCT destination FROM outbox WHERE app_id = %s", (app_id,)).fetchall()
    return {r[0] for r in rows}


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
    known = configured | _pending_destinations(conn, app_id)
    if resuming:
        known |= _held_destinations(conn, app_id)
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
