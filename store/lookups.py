"""Small reads of the log that adapters need to map a notification (they do no I/O themselves).

Stripe refunds: a `charge.refunded` names an invoice or payment intent, never the subscription.
Every Stripe charge fact carries the invoice id as `transaction_id` (and, in payloads before API
version 2025-03-31, the payment intent and charge ids as attributes), so the subscription is found
in the log. From 2025-03-31 ("basil") a charge names only its payment intent and invoices no longer
carry one; the link is the `invoice_payment.paid` event (payment intent → invoice), which is stored
(with no facts) and searched here when the facts do not know the reference.

The facts query uses JSONB containment (`facts @> ...`), which a GIN index on `facts`
(`jsonb_path_ops`) serves when the log grows large; without one it scans this app's Stripe entries.
"""

from __future__ import annotations

import json

import orjson
import psycopg

STRIPE_REFERENCE_SQL = """
SELECT e->>'subscription_id'
FROM event_log l, jsonb_array_elements(l.facts->'events') e
WHERE l.source = 'stripe' AND l.app_id = %(app)s
  AND (l.facts @> %(by_transaction)s::jsonb
       OR l.facts @> %(by_intent)s::jsonb
       OR l.facts @> %(by_charge)s::jsonb)
  AND (e->>'transaction_id' = %(ref)s
       OR e->'attributes'->>'stripe_payment_intent' = %(ref)s
       OR e->'attributes'->>'stripe_charge' = %(ref)s)
  AND e->>'subscription_id' IS NOT NULL
ORDER BY l.position DESC
LIMIT 1
"""


INVOICE_PAYMENT_SQL = """
SELECT raw FROM event_log
WHERE source = 'stripe' AND app_id = %(app)s AND kind = 'invoice_payment.paid'
  AND position(%(needle)s::bytea IN raw) > 0
ORDER BY position DESC
LIMIT 20
"""


def _contains(**fields: object) -> str:
    return orjson.dumps({"events": [fields]}).decode()


def stripe_subscription_for(conn: psycopg.Connection, app_id: str, reference: str) -> str | None:
    """The Stripe subscription id an invoice, payment intent or charge id was charged for, if logged.

    Runs in its own short transactions, so it never leaves one open in front of an ingest.
    """
    found = _by_facts(conn, app_id, reference)
    if found is not None:
        return found
    with conn.transaction():
        candidates = conn.execute(INVOICE_PAYMENT_SQL, {"app": app_id, "needle": reference.encode()}).fetchall()
    for (raw,) in candidates:
        paid_by, invoice = invoice_payment(bytes(raw))
        if reference in paid_by and invoice is not None:
            return _by_facts(conn, app_id, invoice)
    return None


def _by_facts(conn: psycopg.Connection, app_id: str, reference: str) -> str | None:
    params = {
        "app": app_id,
        "ref": reference,
        "by_transaction": _contains(transaction_id=reference),
        "by_intent": _contains(attributes={"stripe_payment_intent": reference}),
        "by_charge": _contains(attributes={"stripe_charge": reference}),
    }
    with conn.transaction():
        row = conn.execute(STRIPE_REFERENCE_SQL, params).fetchone()
    return None if row is None else str(row[0])


def invoice_payment(raw: bytes) -> tuple[set[str], str | None]:
    """An `invoice_payment.paid` body → (payment intent / charge ids it names, the invoice it pays)."""
    try:
        obj = json.loads(raw)["data"]["object"]
        payment = obj.get("payment") or {}
        refs = {_ref(payment.get("payment_intent")), _ref(payment.get("charge"))}
        invoice = _ref(obj.get("invoice"))
    except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
        return set(), None
    return {r for r in refs if r is not None}, invoice


def _ref(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


SUBSCRIPTIONS_OF_SQL = """
SELECT key FROM subscriptions WHERE app_id = %(app)s AND app_user_id = ANY(%(users)s)
UNION
SELECT store_subscription FROM identity_links WHERE app_id = %(app)s AND app_user_id = ANY(%(users)s)
ORDER BY 1
"""


def subscriptions_of(conn: psycopg.Connection, app_id: str, users: list[str]) -> list[str]:
    """Subscription keys of the app that belong to any of `users` (by the fold's state or a link)."""
    if not users:
        return []
    rows = conn.execute(SUBSCRIPTIONS_OF_SQL, {"app": app_id, "users": users}).fetchall()
    return [str(key) for (key,) in rows]


# A chain of store ids (a Google Play purchase token, an Amazon receipt) reaches its root through the
# facts logged under it: the first fact whose attribute names the id carries the subscription id.
CHAIN_ROOT_SQL = """
SELECT e->>'subscription_id'
FROM event_log l, jsonb_array_elements(l.facts->'events') e
WHERE l.source = %(source)s AND l.app_id = %(app)s
  AND l.facts @> %(contains)s::jsonb
  AND e->'attributes'->>%(attribute)s = %(value)s
  AND e->>'subscription_id' IS NOT NULL
ORDER BY l.position
LIMIT 1
"""


def subscription_for_attribute(
    conn: psycopg.Connection, app_id: str, source: str, attribute: str, value: str
) -> str | None:
    """The subscription id the first facts of `source` whose `attributes[attribute]` is `value` were
    logged under, if any (Google's `google_purchase_token`, Amazon's `amazon_receipt_id`).

    Runs in its own short transaction, so it never leaves one open in front of an ingest."""
    params = {"source": source, "app": app_id, "attribute": attribute, "value": value,
              "contains": _contains(attributes={attribute: value})}
    with conn.transaction():
        row = conn.execute(CHAIN_ROOT_SQL, params).fetchone()
    return None if row is None else str(row[0])
