"""Whole subscription histories read in bulk, for the rebuilders (`replay`) and checkers (`verify`).

`store.log.history` reads one subscription per round trip, right for an ingest that re-folds one
subscription; a rebuild of the whole log needs hundreds of subscriptions per statement instead.
Both decode entries the same way (`event_from_facts`), so a bulk read folds to what `history` would.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from subledger.core.events import event_from_facts
from subledger.store.log import LoggedEvent

NEXT_KEYS_SQL = """
SELECT DISTINCT subscription_key FROM event_log
WHERE subscription_key IS NOT NULL AND subscription_key > %s
ORDER BY subscription_key LIMIT %s
"""
HISTORIES_SQL = """
SELECT subscription_key, position, historical, facts FROM event_log
WHERE subscription_key = ANY(%s) ORDER BY subscription_key, position
"""
STATES_SQL = "SELECT key, state, last_position FROM subscriptions WHERE key = ANY(%s)"
TRANSITIONS_SQL = """
SELECT subscription_key, id, superseded_at IS NOT NULL FROM transitions WHERE subscription_key = ANY(%s)
"""


def next_keys(conn: psycopg.Connection, after: str, limit: int) -> list[str]:
    """The next `limit` subscription keys of the log after `after`, in key order (keyset paging)."""
    return [r[0] for r in conn.execute(NEXT_KEYS_SQL, (after, limit)).fetchall()]


def _logged(position: int, historical: bool, facts: dict[str, Any]) -> Iterator[LoggedEvent]:
    for fact in facts["events"]:
        yield LoggedEvent(event_from_facts(fact), int(position), bool(historical))


def histories(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, list[LoggedEvent]]:
    """key → every fact of its log entries, as `store.log.history` returns them."""
    out: dict[str, list[LoggedEvent]] = defaultdict(list)
    for key, position, historical, facts in conn.execute(HISTORIES_SQL, (list(keys),)).fetchall():
        out[key].extend(_logged(position, historical, facts))
    return out


def stored_states(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, tuple[dict[str, Any], int]]:
    """key → (projection state as stored JSON, last_position)."""
    return {k: (state, int(last)) for k, state, last in conn.execute(STATES_SQL, (list(keys),)).fetchall()}


def emitted(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, dict[str, bool]]:
    """key → {transition id → superseded?}, what `projections.existing_transitions` says per key."""
    out: dict[str, dict[str, bool]] = defaultdict(dict)
    for key, tid, gone in conn.execute(TRANSITIONS_SQL, (list(keys),)).fetchall():
        out[key][tid] = bool(gone)
    return out


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
