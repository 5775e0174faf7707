"""The identify a new identity link sends at once, so Segment merges the profiles before the next event.

Linking (`POST /v1/subscribers/{user}/links`) changes whom later messages are attributed to (see
`outbox.writer.rows_for(linked_user=)`); this module also tells the destinations now: one
`identify` per destination with `userId` = the linked user, the ids the subscription was known by
as `traits.aliases`, and its current status. Its messageId is a digest of (subscription, user,
destination), so linking the same user again sends nothing new, and it queues behind the user's
other messages like any outbox row. The row's `transition_id` is `link:<subscription key>`, which
no transition can be, so the audit timeline can list it with the subscription's deliveries.

`link` is the one way a subscription gets linked, whoever asks: the links API, and a RevenueCat
`TRANSFER` (webhook or `subledger ingest --format revenuecat`) alike, so every link is told the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

import psycopg

from subledger.core.events import Environment
from subledger.core.lifecycle import SubscriptionState, anonymous_id
from subledger.core.render import LIBRARY_NAME, Destination, iso_millis
from subledger.core.sources.revenuecat import TransferLinks
from subledger.store import identity, lookups, projections
from subledger.store import outbox as outbox_sql

LINK_PREFIX = "link:"


def link_id(subscription_key: str) -> str:
    return LINK_PREFIX + subscription_key


def message_id(subscription_key: str, app_user_id: str, destination: str) -> str:
    digest = hashlib.sha256(f"link\x1f{subscription_key}\x1f{app_user_id}\x1f{destination}".encode()).hexdigest()
    return f"sl-{digest[:40]}.i"


def identify_rows(
    state: SubscriptionState, app_user_id: str, destinations: Sequence[Destination], now: datetime
) -> list[outbox_sql.OutboxRow]:
    """One identify per destination that takes this subscription's environment."""
    anonymous = anonymous_id(state.key)
    aliases = list(dict.fromkeys(i for i in (anonymous, state.app_user_id, app_user_id) if i))
    traits: dict[str, object] = {"aliases": aliases, "last_seen_app_user_id": app_user_id}
    if state.status is not None:
        traits["subscription_status"] = state.status.value
    rows: list[outbox_sql.OutboxRow] = []
    for dest in destinations:
        if state.environment is Environment.SANDBOX and not dest.send_sandbox:
            continue
        mid = message_id(state.key, app_user_id, dest.name)
        body = {
            "type": "identify",
            "messageId": mid,
            "userId": app_user_id,
            "traits": traits,
            "timestamp": iso_millis(now),
            "context": {
                "environment": state.environment.value,
                "library": {"name": LIBRARY_NAME, "version": dest.library_version},
            },
        }
        if not state.app_user_id:
            body["anonymousId"] = anonymous  # both ids in one call: Segment merges the two profiles
        rows.append(outbox_sql.OutboxRow(mid, link_id(state.key), dest.name, state.app_id, app_user_id, [body], now))
    return rows


def send_link_identify(
    conn: psycopg.Connection, subscription_key: str, app_user_id: str, destinations: Sequence[Destination],
    now: datetime,
) -> list[str]:
    """Enqueue the link's identify (inside the caller's transaction); the messageIds newly queued.

    Nothing is sent for a subscription the log has not seen yet: its first message will carry the
    linked user and the aliases anyway.
    """
    state = projections.load_state(conn, subscription_key)
    if state is None:
        return []
    rows = identify_rows(state, app_user_id, destinations, now)
    present = outbox_sql.existing_messages(conn, [r.message_id for r in rows])
    outbox_sql.insert_missing(conn, rows, now)
    return [r.message_id for r in rows if r.message_id not in present]


def link(
    conn: psycopg.Connection, app_id: str, subscription_key: str, app_user_id: str,
    destinations: Sequence[Destination], now: datetime,
) -> tuple[str | None, list[str]]:
    """Link (or re-link) a subscription to a user and enqueue the link's identify, in the caller's
    transaction; returns the user it was linked to before and the identify messageIds newly queued."""
    previous = identity.link(conn, app_id, subscription_key, app_user_id, now)
    return previous, send_link_identify(conn, subscription_key, app_user_id, destinations, now)


def apply_transfer(
    conn: psycopg.Connection, app_id: str, moved: TransferLinks, destinations: Sequence[Destination], now: datetime
) -> list[str]:
    """A RevenueCat TRANSFER: the senders' subscriptions now belong to the receiver, linked (and told)
    exactly as the links API does. Idempotent, so applying it again on a redelivery heals a crash
    between the log's commit and the links. Returns the identify messageIds newly queued."""
    target = moved.receiver
    if target is None:
        return []
    sent: list[str] = []
    with conn.transaction():
        for key in lookups.subscriptions_of(conn, app_id, list(moved.transferred_from)):
            sent += link(conn, app_id, key, target, destinations, now)[1]
    return sent
