"""Console: revenue per day, search by a store's transaction id, the last `verify` result.

- `transitions.price` / `transitions.currency`: stored generated columns copied from the body (as
  text, exactly as the fold wrote them, so no cast can ever make an insert fail), covered by the
  partial index `transitions_revenue` on `occurred_at`: the overview's revenue per day and app is
  an index-only range over the transitions that carry a price, never a read of their JSON.
- `event_log_references`: a GIN index (jsonb_path_ops) over the store ids a log entry's facts name
  beyond the subscription id: each fact's `transaction_id` (Apple transactionId, Google orderId,
  Stripe invoice, Amazon receipt) and `refund_id`, and the attributes that carry a chain's other
  ids (Google purchase tokens, Amazon receipts, Stripe payment intents and charges). Built from
  `jsonb_path_query_array` in lax mode, which yields nothing (never an error) for facts without
  them, so an append cannot fail on it. The console's search (store/console.py) uses the same
  expression.
- `verify_runs`: each `subledger verify` result (when, ok, sizes, problems, the first bad
  position), keyed by when it finished, so the console shows the last one and its age.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"

REFERENCES = (
    "(((((((jsonb_path_query_array(facts, '$.events[*].transaction_id')"
    " || jsonb_path_query_array(facts, '$.events[*].refund_id'))"
    " || jsonb_path_query_array(facts, '$.events[*].attributes.google_purchase_token'))"
    " || jsonb_path_query_array(facts, '$.events[*].attributes.amazon_receipt_id'))"
    " || jsonb_path_query_array(facts, '$.events[*].attributes.amazon_cancelled_receipt_id'))"
    " || jsonb_path_query_array(facts, '$.events[*].attributes.stripe_invoice'))"
    " || jsonb_path_query_array(facts, '$.events[*].attributes.stripe_payment_intent'))"
    " || jsonb_path_query_array(facts, '$.events[*].attributes.stripe_charge'))"
)


def upgrade() -> None:
    op.execute(
        f"""
        ALTER TABLE transitions
          ADD COLUMN price text GENERATED ALWAYS AS (body->>'price') STORED,
          ADD COLUMN currency text GENERATED ALWAYS AS (body->>'currency') STORED;
        CREATE INDEX transitions_revenue ON transitions (occurred_at)
          INCLUDE (app_id, price, currency, superseded_at) WHERE price IS NOT NULL;

        CREATE INDEX event_log_references ON event_log USING gin ({REFERENCES} jsonb_path_ops);

        CREATE TABLE verify_runs (
          finished_at timestamptz PRIMARY KEY,
          started_at timestamptz NOT NULL,
          ok boolean NOT NULL,
          entries bigint NOT NULL,
          subscriptions bigint NOT NULL,
          problem_count bigint NOT NULL,
          first_bad_position bigint
        );
        GRANT SELECT, INSERT, UPDATE, DELETE ON verify_runs TO {APP_ROLE};
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE verify_runs;
        DROP INDEX event_log_references;
        DROP INDEX transitions_revenue;
        ALTER TABLE transitions DROP COLUMN price, DROP COLUMN currency;
        """
    )
