"""The store ids a log entry's facts name beyond the subscription id, as one SQL expression.

The expression of the GIN index `event_log_references` (migration 0009), spelled exactly as
PostgreSQL prints it back, so the models (store/models.py) compare equal to the migrated schema and
the console's search (store/console.py) repeats the very expression the planner matches to the
index: each fact's `transaction_id` (Apple transactionId, Google orderId, a Stripe invoice, an
Amazon receipt) and `refund_id`, and the attributes that carry a chain's other ids (Google purchase
tokens, Amazon receipts, Stripe invoices, payment intents and charges). Its own module so the
runtime need not import the models (SQLAlchemy) to search.
"""

from __future__ import annotations

from typing import Final

FACT_REFERENCES: Final[str] = (
    "(((((((jsonb_path_query_array(facts, '$.\"events\"[*].\"transaction_id\"'::jsonpath)"
    " || jsonb_path_query_array(facts, '$.\"events\"[*].\"refund_id\"'::jsonpath))"
    " || jsonb_path_query_array(facts, '$.\"events\"[*].\"attributes\".\"google_purchase_token\"'::jsonpath))"
    " || jsonb_path_query_array(facts, '$.\"events\"[*].\"attributes\".\"amazon_receipt_id\"'::jsonpath))"
    " || jsonb_path_query_array(facts, '$.\"events\"[*].\"attributes\".\"amazon_cancelled_receipt_id\"'::jsonpath))"
    " || jsonb_path_query_array(facts, '$.\"events\"[*].\"attributes\".\"stripe_invoice\"'::jsonpath))"
    " || jsonb_path_query_array(facts, '$.\"events\"[*].\"attributes\".\"stripe_payment_intent\"'::jsonpath))"
    " || jsonb_path_query_array(facts, '$.\"events\"[*].\"attributes\".\"stripe_charge\"'::jsonpath))"
)
