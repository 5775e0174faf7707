"""Stripe end to end: POST /webhooks/stripe/{app} (signed) → log → fold → relay → fake Segment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from test_source_stripe import (
    PRICE,
    SUB,
    T0,
    USER,
    YEARLY,
    charge,
    event,
    invoice,
    refund_object,
    subscription,
    with_refunds,
)
from webhooks_support import (
    STRIPE_APP,
    Pipeline,
    log_count,
    pipeline,
    statuses,
    stripe_headers,
    superseded,
    track,
    tracks,
    write_root,
)

COMMON = {"store": "STRIPE", "environment": "PRODUCTION"}
PATH = f"/webhooks/stripe/{STRIPE_APP}"


@pytest.fixture
def p(db_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with pipeline(db_url, write_root(tmp_path)) as running:
        yield running


def encode(evt: dict[str, Any]) -> bytes:
    return json.dumps(evt, separators=(",", ":")).encode()


def send(p: Pipeline, *events: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    out = []
    for evt in events:
        raw = evt if isinstance(evt, bytes) else encode(evt)
        out.append(p.post(PATH, raw, stripe_headers(raw)))
    return out


def paid_start(invoice_id: str = "in_start", amount: int = 999) -> dict[str, Any]:
    inv = invoice(invoice_id=invoice_id, billing_reason="subscription_create", amount_paid=amount,
                  period_start=T0, period_end=T0 + timedelta(days=30), created=T0)
    return event("invoice.paid", inv, event_id="evt_start", created=T0)


def trialing(event_id: str = "evt_trial") -> dict[str, Any]:
    sub = subscription(status="trialing", trial_end=T0 + timedelta(days=14), period_end=T0 + timedelta(days=14))
    return event("customer.subscription.created", sub, event_id=event_id, created=T0)


def test_bundled_lifecycle_trial_converted_renewal_cancellation_expiration(p: Pipeline) -> None:
    sample = resources.files("subledger.app.samples").joinpath("stripe_lifecycle.ndjson").read_bytes()
    lines = [line for line in sample.splitlines() if line.strip()]
    results = send(p, *lines)
    assert [r["result"] for r in results] == ["new"] * len(lines)
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, revenue=None, currency=None, product_id=PRICE, period_type="TRIAL",
              **COMMON),
        track("rc_trial_converted_event", USER, revenue=9.99, currency="USD", product_id=PRICE,
              period_type="NORMAL", transaction_id="in_1RMFitnessConv01", **COMMON),
        track("rc_renewal_event", USER, revenue=9.99, currency="USD", product_id=PRICE, period_type="NORMAL",
              transaction_id="in_1RUFitnessRenw02", **COMMON),
        track("rc_cancellation_event", USER, product_id=PRICE, period_type="NORMAL", cancel_reason="UNSUBSCRIBE",
              **COMMON),
        track("rc_expiration_event", USER, product_id=PRICE, period_type="NORMAL", expiration_reason="UNSUBSCRIBE",
              **COMMON),
    ]
    assert statuses(messages) == ["trial", "active", "active", "cancelled", "expired"]
    converted = next(m for m in messages if m.get("event") == "rc_trial_converted_event")
    assert converted["properties"]["original_transaction_id"] == SUB
    assert converted["properties"]["app_id"] == STRIPE_APP


def test_trial_cancelled(p: Pipeline) -> None:
    trial_end = T0 + timedelta(days=14)
    cancelling = subscription(status="trialing", trial_end=trial_end, period_end=trial_end,
                              cancel_at_period_end=True, cancel_at=trial_end,
                              cancellation_reason="cancellation_requested")
    ended = subscription(status="canceled", trial_end=trial_end, period_end=trial_end, cancel_at_period_end=True,
                         cancel_at=trial_end, ended_at=trial_end, cancellation_reason="cancellation_requested")
    send(
        p,
        trialing(),
        event("customer.subscription.updated", cancelling, event_id="evt_off", created=T0 + timedelta(days=3),
              previous={"cancel_at_period_end": False, "cancel_at": None}),
        event("customer.subscription.deleted", ended, event_id="evt_end", created=trial_end),
    )
    messages = p.relay()
    trial = {"product_id": PRICE, "period_type": "TRIAL", **COMMON}
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, **trial),
        track("rc_trial_cancelled_event", USER, cancel_reason="UNSUBSCRIBE", **trial),
        track("rc_expiration_event", USER, expiration_reason="UNSUBSCRIBE", **trial),
    ]
    assert statuses(messages) == ["trial", "cancelled_trial", "expired"]


def test_billing_issue_then_recovery(p: Pipeline) -> None:
    due = T0 + timedelta(days=30)
    failed = invoice(invoice_id="in_cycle", period_start=due, period_end=due + timedelta(days=30), created=due,
                     status="open", amount_paid=0)
    recovered = invoice(invoice_id="in_cycle", period_start=due, period_end=due + timedelta(days=30), created=due,
                        attempt_count=2)
    send(
        p,
        paid_start(),
        event("invoice.payment_failed", failed, event_id="evt_failed", created=due),
        event("invoice.paid", recovered, event_id="evt_recovered", created=due + timedelta(days=2)),
    )
    messages = p.relay()
    paid = {"currency": "USD", "product_id": PRICE, "period_type": "NORMAL", **COMMON}
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id="in_start", **paid),
        track("rc_billing_issue_event", USER, product_id=PRICE, period_type="NORMAL", transaction_id="in_cycle",
              **COMMON),
        track("rc_renewal_event", USER, revenue=9.99, transaction_id="in_cycle", **paid),
    ]
    assert statuses(messages) == ["active", "grace_period", "active"]


def test_refund_found_through_the_log_is_negative_revenue(p: Pipeline) -> None:
    refund = event("charge.refunded", charge(invoice_ref="in_start"), event_id="evt_refund",
                   created=T0 + timedelta(days=2))
    send(p, paid_start(), refund)
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="USD", product_id=PRICE,
              period_type="NORMAL", transaction_id="in_start", **COMMON),
        # the charge names no user; the subscription's user is known from the log
        track("rc_cancellation_event", USER, revenue=-9.99, currency="USD", product_id=PRICE,
              period_type="NORMAL", transaction_id="in_start", cancel_reason="CUSTOMER_SUPPORT", **COMMON),
    ]


def test_upgrade_is_a_product_change(p: Pipeline) -> None:
    before = subscription(period_end=T0 + timedelta(days=30))
    after = subscription(period_end=T0 + timedelta(days=30), price_id=YEARLY)
    send(
        p,
        paid_start(),
        event("customer.subscription.updated", after, event_id="evt_upgrade", created=T0 + timedelta(days=5),
              previous={"items": before["items"]}),
    )
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="USD", product_id=PRICE,
              period_type="NORMAL", transaction_id="in_start", **COMMON),
        track("rc_product_change_event", USER, product_id=PRICE, new_product_id=YEARLY, period_type="NORMAL",
              **COMMON),
    ]


def test_the_same_event_twice_and_both_invoice_events_charge_once(p: Pipeline) -> None:
    paid = paid_start()
    succeeded = {**paid, "id": "evt_succeeded", "type": "invoice.payment_succeeded"}
    results = send(p, paid, paid, succeeded)
    assert [r["result"] for r in results] == ["new", "duplicate", "new"]
    assert [len(r["transitions"]) for r in results] == [1, 0, 0]
    assert log_count(p.db_url) == 2
    assert [m["event"] for m in p.relay() if m["type"] == "track"] == ["rc_initial_purchase_event"]


def test_a_pair_delivered_out_of_order_settles_as_if_in_order(p: Pipeline) -> None:
    trial_end = T0 + timedelta(days=14)
    conversion = invoice(invoice_id="in_conv", period_start=trial_end, period_end=trial_end + timedelta(days=30),
                         created=trial_end)
    send(p, event("invoice.paid", conversion, event_id="evt_conv", created=trial_end), trialing())
    messages = p.relay()
    assert [(t["event"], t["revenue"]) for t in tracks(messages)] == [
        ("rc_trial_started_event", None),
        ("rc_trial_converted_event", 9.99),
    ]
    assert superseded(p.db_url) == 1


# -- issue 14: each refund is its own fact; a refund leaves a Stripe subscription running ------------


def test_two_partial_refunds_are_two_cancellations_and_the_subscription_stays_active(p: Pipeline) -> None:
    first = event("charge.refunded", charge(invoice_ref="in_start", refunded=250), event_id="evt_refund_1",
                  created=T0 + timedelta(days=2), previous={"amount_refunded": 0, "refunded": False})
    second = event("charge.refunded", charge(invoice_ref="in_start", refunded=499), event_id="evt_refund_2",
                   created=T0 + timedelta(days=3), previous={"amount_refunded": 250})
    renewal = invoice(invoice_id="in_cycle", period_start=T0 + timedelta(days=30),
                      period_end=T0 + timedelta(days=60), created=T0 + timedelta(days=30))
    results = send(p, paid_start(), first, second,
                   event("invoice.paid", renewal, event_id="evt_renew", created=T0 + timedelta(days=30)))
    assert [len(r["transitions"]) for r in results] == [1, 1, 1, 1]
    messages = p.relay()
    refunded = {"currency": "USD", "product_id": PRICE, "period_type": "NORMAL", "transaction_id": "in_start",
                "cancel_reason": "CUSTOMER_SUPPORT", **COMMON}
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="USD", product_id=PRICE,
              period_type="NORMAL", transaction_id="in_start", **COMMON),
        track("rc_cancellation_event", USER, revenue=-2.50, **refunded),
        track("rc_cancellation_event", USER, revenue=-2.49, **refunded),
        track("rc_renewal_event", USER, revenue=9.99, currency="USD", product_id=PRICE, period_type="NORMAL",
              transaction_id="in_cycle", **COMMON),
    ]
    assert statuses(messages) == ["active", "active", "active", "active"]


def test_a_refund_told_by_refund_created_and_charge_refunded_is_sent_once(p: Pipeline) -> None:
    at = T0 + timedelta(days=2)
    r1, r2 = refund_object("re_1", 250, at), refund_object("re_2", 249, at + timedelta(days=1))
    send(
        p,
        paid_start(),
        event("charge.refunded", with_refunds(charge(invoice_ref="in_start", refunded=250), r1),
              event_id="evt_ch_1", created=at),
        event("refund.created", r1, event_id="evt_re_1", created=at),  # same refund, same second
        # the second refund: its refund.created arrives after the charge.refunded that lists both
        event("charge.refunded", with_refunds(charge(invoice_ref="in_start", refunded=499), r1, r2),
              event_id="evt_ch_2", created=at + timedelta(days=1)),
        event("refund.created", r2, event_id="evt_re_0", created=at + timedelta(days=1)),
    )
    messages = p.relay()
    assert [(t["event"], t["revenue"]) for t in tracks(messages)] == [
        ("rc_initial_purchase_event", 9.99), ("rc_cancellation_event", -2.50), ("rc_cancellation_event", -2.49)]
    assert superseded(p.db_url) == 0
