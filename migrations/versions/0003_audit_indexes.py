"""Audit: the indexes `audit timeline` and `audit stats` need at a million events.

- `audit stats` counts log entries and transitions received in a range by source, app and
  environment. Both tables already had a time index (0001); they become covering indexes, so the
  counts are index-only scans instead of reads of every row's JSON. The transition's source and
  environment live in its JSON body; they become stored generated columns to be coverable.
- Dead outbox rows get a small partial index (pending ones already have two), so counting them
  never reads the outbox, which holds every rendered body.
- `audit timeline USER` finds a user's linked subscriptions by user, not by the (app, subscription)
  primary key of identity_links.

Each replaced index keeps its name and leading column, so no query loses its plan and ingest
maintains the same number of indexes on the log and the transitions as before.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        DROP INDEX event_log_received;
        CREATE INDEX event_log_received ON event_log (received_at) INCLUDE (source, app_id, environment);

        ALTER TABLE transitions
          ADD COLUMN event_source text GENERATED ALWAYS AS (body->>'event_source') STORED,
          ADD COLUMN environment text GENERATED ALWAYS AS (body->>'environment') STORED;
        DROP INDEX transitions_created;
        CREATE INDEX transitions_created ON transitions (created_at)
          INCLUDE (kind, app_id, event_source, environment, superseded_at);

        CREATE INDEX outbox_dead ON outbox (app_id, destination) WHERE status = 'dead';
        CREATE INDEX identity_links_app_user ON identity_links (app_user_id);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX identity_links_app_user;
        DROP INDEX outbox_dead;
        DROP INDEX transitions_created;
        ALTER TABLE transitions DROP COLUMN event_source, DROP COLUMN environment;
        CREATE INDEX transitions_created ON transitions (created_at);
        DROP INDEX event_log_received;
        CREATE INDEX event_log_received ON event_log (received_at);
        """
    )
