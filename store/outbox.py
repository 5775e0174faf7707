"""The outbox table family: `outbox`, `outbox_attempts`, `outbox_delivered`, `destination_state`.

Every statement that reads or writes these tables lives here, one function per operation, so the
relay (outbox/relay.py), its lease heartbeat, the operator commands (outbox/ops.py) and the
destination health bookkeeping share one definition of what a row's state means. Callers pass
typed values in and get dataclasses back; no SQL text leaves this module.

Driver errors leave only through the store's door (`store.db.translate_errors`): a caller catches
subledger's own `StoreError` family, never `psycopg.Error`.

Two sections: the writes that create and withdraw outbox rows (owned by the ingest side) and the
relay/operations side (claim, outcomes, leases, destination state, operator reads).
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from subledger.store.db import translate_errors

# ---------------------------------------------------------------------------------------------
# Section: outbox rows written by ingest/replay (INSERT, withdraw). Owned by helper "store-core".
# ---------------------------------------------------------------------------------------------

# (store-core adds its functions here)

# ---------------------------------------------------------------------------------------------
# End of the ingest section.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Section: relay, lease heartbeat, destination state and operator commands. Owned by "relay".
# ---------------------------------------------------------------------------------------------


def pause_destination(
    conn: psycopg.Connection, app_id: str, destination: str, reason: str, now: datetime, *, key: str | None = None
) -> None:
    """Stop sending to a destination; its rows stay pending. `key`: resume when the config changes
    (a route's fingerprint); None: a manual pause that stays until `resume_destinations`."""
    with translate_errors():
        conn.execute(
            """
            INSERT INTO destination_state (app_id, destination, paused, paused_reason, paused_at, paused_key)
            VALUES (%s, %s, true, %s, %s, %s)
            ON CONFLICT (app_id, destination) DO UPDATE SET paused = true,
              paused_reason = EXCLUDED.paused_reason, paused_at = EXCLUDED.paused_at,
              paused_key = EXCLUDED.paused_key
            """,
            (app_id, destination, reason, now, key),
        )


def resume_destinations(conn: psycopg.Connection, app_id: str, destination: str | None = None) -> list[tuple[str, str]]:
    """Resume one destination of an app, or all of them; also lifts a pending rate-limit wait, and a
    failing destination is probed at once. Returns the (app_id, destination) pairs touched."""
    with translate_errors():
        rows = conn.execute(
            """
            UPDATE destination_state SET paused = false, paused_reason = NULL, paused_at = NULL,
              paused_key = NULL, retry_after = NULL, probe_at = NULL
            WHERE app_id = %s AND (%s::text IS NULL OR destination = %s)
            RETURNING app_id, destination
            """,
            (app_id, destination, destination),
        ).fetchall()
    return [(str(a), str(d)) for a, d in rows]
