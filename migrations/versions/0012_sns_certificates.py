"""SNS signing certificates, kept as fetched, so a logged Amazon notification can be re-verified.

An Amazon RTN entry stores the SNS envelope verbatim (its `Signature` and `SigningCertURL`
included), but checking that signature needs the certificate the URL named. The webhook fetches it
(from the pinned SNS hosts only) and now also keeps it here, keyed by URL with when it was first
and last fetched, so the console's payload viewer re-verifies the entry offline, without a page
ever reaching for the network (app/console/signature.py).

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"


def upgrade() -> None:
    op.execute(
        f"""
        CREATE TABLE sns_certificates (
          url text PRIMARY KEY,
          pem bytea NOT NULL,
          first_fetched_at timestamptz NOT NULL,
          last_fetched_at timestamptz NOT NULL
        );
        GRANT SELECT, INSERT, UPDATE, DELETE ON sns_certificates TO {APP_ROLE};
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE sns_certificates")
