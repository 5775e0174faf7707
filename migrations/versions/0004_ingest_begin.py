"""One round trip to start an ingest: lock the chain head, find duplicates, lock states, read links.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In READ COMMITTED each statement of a VOLATILE function takes a fresh snapshot, so the
    # duplicate check below sees a concurrent writer that committed while we waited for the lock.
    op.execute(
        """
        CREATE FUNCTION subledger_ingest_begin(
          p jsonb, OUT head_position bigint, OUT head_hash bytea, OUT seen text[], OUT states jsonb, OUT links jsonb)
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
          SELECT h.position, h.hash INTO head_position, head_hash FROM log_head h FOR UPDATE;
          SELECT coalesce(array_agg(l.source || chr(31) || l.external_id), '{}') INTO seen
            FROM event_log l
            JOIN jsonb_to_recordset(p->'entries') AS k(source text, external_id text)
              ON l.source = k.source AND l.external_id = k.external_id;
          SELECT coalesce(jsonb_object_agg(s.key, s.state), '{}') INTO states
            FROM (SELECT key, state FROM subscriptions
                  WHERE key IN (SELECT jsonb_array_elements_text(p->'keys')) ORDER BY key FOR UPDATE) s;
          SELECT coalesce(jsonb_object_agg(l.store_subscription, l.app_user_id), '{}') INTO links
            FROM identity_links l
            JOIN jsonb_to_recordset(p->'links') AS k(app_id text, store_subscription text)
              ON l.app_id = k.app_id AND l.store_subscription = k.store_subscription;
        END $$;
        GRANT EXECUTE ON FUNCTION subledger_ingest_begin(jsonb) TO subledger_app;
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION subledger_ingest_begin(jsonb)")
