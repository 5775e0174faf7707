"""Retention: what the prune job (store/retention.py) needs to bound the delivery tables.

- A delivered message past its retention keeps its `outbox_delivered` row as a tombstone and loses
  only its rendered body: the row is what stops a replay from enqueueing the messageId again, so it
  can never go. `body` becomes nullable (NULL = pruned); a metadata-only change.
- `outbox_attempts` and `duplicate_receipts` get a time index, so each small batch finds the
  oldest rows without a scan, whatever order they were written in.
- The app role may only add receipts (0001); it prunes them through a SECURITY DEFINER function
  that deletes by age alone, in a batch, and never receipts of the last day.
- `retention_watermarks` says, per table, that nothing older than `pruned_before` is kept: the
  audit timeline shows it next to the history it concerns.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"


def upgrade() -> None:
    op.execute(
        f"""
        ALTER TABLE outbox_delivered ALTER COLUMN body DROP NOT NULL;
        CREATE INDEX outbox_attempts_at ON outbox_attempts (attempted_at, id);
        CREATE INDEX duplicate_receipts_received ON duplicate_receipts (received_at);

        CREATE TABLE retention_watermarks (
          name text PRIMARY KEY,
          pruned_before timestamptz NOT NULL,
          pruned_at timestamptz NOT NULL,
          rows bigint NOT NULL DEFAULT 0
        );
        GRANT SELECT, INSERT, UPDATE ON retention_watermarks TO {APP_ROLE};

        CREATE FUNCTION subledger_prune_duplicate_receipts(before timestamptz, batch integer)
        RETURNS integer LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
        DECLARE
          gone integer;
        BEGIN
          DELETE FROM duplicate_receipts WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM duplicate_receipts
            WHERE received_at < least(before, now() - interval '1 day')
            ORDER BY received_at LIMIT greatest(batch, 0)));
          GET DIAGNOSTICS gone = ROW_COUNT;
          RETURN gone;
        END $$;
        REVOKE ALL ON FUNCTION subledger_prune_duplicate_receipts(timestamptz, integer) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION subledger_prune_duplicate_receipts(timestamptz, integer) TO {APP_ROLE};
        """
    )


def downgrade() -> None:
    # A tombstone has no body to restore, and deleting it would let a replay send its messageId
    # again: it keeps an empty body instead.
    op.execute(
        """
        DROP FUNCTION subledger_prune_duplicate_receipts(timestamptz, integer);
        DROP TABLE retention_watermarks;
        DROP INDEX duplicate_receipts_received;
        DROP INDEX outbox_attempts_at;
        UPDATE outbox_delivered SET body = '[]' WHERE body IS NULL;
        ALTER TABLE outbox_delivered ALTER COLUMN body SET NOT NULL;
        """
    )
