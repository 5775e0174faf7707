"""Relay: remember which configuration a destination was paused under, so a config change resumes it.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A fingerprint of (endpoint, write keys) at the time of a 401/403/404; NULL for a manual pause,
    # which only `subledger outbox resume` lifts.
    op.execute("ALTER TABLE destination_state ADD COLUMN paused_key text")


def downgrade() -> None:
    op.execute("ALTER TABLE destination_state DROP COLUMN paused_key")
