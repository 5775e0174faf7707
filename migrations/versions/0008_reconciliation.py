"""Reconciliation: how each fact arrived, and where each reconciler resumes.

- `event_log.arrival` (push, reconciliation or import): a fact a store pushed to a webhook and one
  recovered by asking the store's API afterwards are told apart forever, so the audit shows which
  facts the push channel lost. Existing rows are pushes (the default); the hash covers the column
  only when it is not `push` (core/chain.py), so every hash already written stays valid. No CHECK
  constraint: the values are checked in code, and verify's hash names an edited value.
- `reconciliation_cursors`: per source and app, the newest store timestamp a run has fully read,
  so the next run resumes there instead of re-listing the whole window.
- `event_log_not_pushed`: a partial index over the entries that did not arrive by push.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"


def upgrade() -> None:
    op.execute(
        f"""
        ALTER TABLE event_log ADD COLUMN arrival text NOT NULL DEFAULT 'push';
        -- the few entries that did not arrive by push: the recovered counter at every /metrics
        -- scrape and `audit events --arrival` read these alone, never the whole log
        CREATE INDEX event_log_not_pushed ON event_log (arrival, app_id, source) WHERE arrival <> 'push';
        CREATE TABLE reconciliation_cursors (
          source text NOT NULL,
          app_id text NOT NULL,
          read_until timestamptz NOT NULL,
          updated_at timestamptz NOT NULL,
          PRIMARY KEY (source, app_id)
        );
        GRANT SELECT, INSERT, UPDATE ON reconciliation_cursors TO {APP_ROLE};
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE reconciliation_cursors;
        ALTER TABLE event_log DROP COLUMN arrival;
        """
    )
