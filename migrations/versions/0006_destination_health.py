"""Relay: a destination's health, so an outage is backed off per destination, not per row.

While a destination fails (5xx, timeouts, refused connections), the relay holds its whole backlog
and sends one small probe at `probe_at`; the first success releases everything at once. Kept in
the database (not in a relay's memory) so every relay process honours the same backoff, a restart
does not forget it, and the outage's start is known when it ends.

- `failing_since`: when the first failure of the current outage was recorded; NULL when healthy.
- `failures`: consecutive failed requests since then (drives the probe backoff).
- `failing_reason`: the last failure's status or error, for operators.
- `probe_at`: the next probe's time (also the slot a relay takes while its probe is in flight).

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE destination_state
          ADD COLUMN failing_since timestamptz,
          ADD COLUMN failures integer NOT NULL DEFAULT 0,
          ADD COLUMN failing_reason text,
          ADD COLUMN probe_at timestamptz
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE destination_state
          DROP COLUMN failing_since, DROP COLUMN failures, DROP COLUMN failing_reason, DROP COLUMN probe_at
        """
    )
