"""Identity links: an operator's statement that a store subscription belongs to an app user.

Stores often know a subscription before the app does (an Apple notification carries no user id
until the app sends `appAccountToken`), so messages start out anonymous. A link made later
(`POST /v1/subscribers/{app_user_id}/links`) attributes every message rendered afterwards to the
user. Links are read by `(app_id, subscription key)`, the table's primary key.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import psycopg

LINKS_SQL = """
SELECT l.store_subscription, l.app_user_id FROM identity_links l
JOIN unnest(%s::text[], %s::text[]) AS k(app_id, store_subscription)
  ON l.app_id = k.app_id AND l.store_subscription = k.store_subscription
"""


def links_for(conn: psycopg.Connection, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """subscription key → linked app user id, for the (app_id, subscription key) pairs that have one."""
    apps, keys = [], []
    for app_id, key in pairs:
        apps.append(app_id)
        keys.append(key)
    return {str(key): str(user) for key, user in conn.execute(LINKS_SQL, (apps, keys)).fetchall()}


def link(conn: psycopg.Connection, app_id: str, subscription_key: str, app_user_id: str, now: datetime) -> str | None:
    """Link (or re-link) a subscription to a user; returns the user it was linked to before, if any."""
    row = conn.execute(
        """
        WITH before AS (
          SELECT app_user_id FROM identity_links WHERE app_id = %(app)s AND store_subscription = %(key)s
        ), upsert AS (
          INSERT INTO identity_links (app_id, store_subscription, app_user_id, linked_at)
          VALUES (%(app)s, %(key)s, %(user)s, %(now)s)
          ON CONFLICT (app_id, store_subscription) DO UPDATE
            SET app_user_id = EXCLUDED.app_user_id, linked_at = EXCLUDED.linked_at
        )
        SELECT app_user_id FROM before
        """,
        {"app": app_id, "key": subscription_key, "user": app_user_id, "now": now},
    ).fetchone()
    return None if row is None else str(row[0])


def links_of(conn: psycopg.Connection, app_user_id: str) -> list[tuple[str, str, datetime]]:
    """(app_id, subscription key, linked_at) of every subscription linked to the user."""
    rows = conn.execute(
        "SELECT app_id, store_subscription, linked_at FROM identity_links WHERE app_user_id = %s ORDER BY 2",
        (app_user_id,),
    ).fetchall()
    return [(a, k, t) for a, k, t in rows]
