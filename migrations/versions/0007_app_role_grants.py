"""Least privilege: what the application role needs to start and run serve, relay and ingest.

- `serve`, `relay` and `ingest` read the schema revision at start (store/migrate.py) to run on a
  current schema without migrating it; `subledger_app` gets SELECT on `alembic_version` (only
  the owner writes it).
- Tables and sequences that later migrations create must be granted there; this one also
  re-grants USAGE on every sequence of the schema, so none created since 0001 is missed.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"


def upgrade() -> None:
    op.execute(
        f"""
        GRANT SELECT ON alembic_version TO {APP_ROLE};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE};
        """
    )


def downgrade() -> None:
    op.execute(f"REVOKE SELECT ON alembic_version FROM {APP_ROLE}")
