"""App Store Server Notifications V2 end to end: POST /webhooks/apple → log → fold → relay → fake Segment.

Notifications are signed by the test chain of `apple_signing` and verified by Apple's own
`SignedDataVerifier` against its root, saved to a file and named in the configuration.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apple_signing import ms, notification, renewal_info, transaction
from webhooks_support import CA, Pipeline, log_count, pipeline, statuses, superseded, track, tracks, write_root

USER = "7e3fb20b-4cdb-47cc-936d-99d65f608138"  # the transactions' appAccountToken
OTID = "2000000111111111"
MONTHLY = "com.example.fitness.monthly"
YEARLY = "com.example.fitness.yearly"
PROD = "Production"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
JSON = {"Content-Type": "application/json"}
COMMON = {"store": "APP_STORE", "environment": "PRODUCTION"}


@pytest.fixture
def p(db_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with pipeline(db_url, write_root(tmp_path)) as running:
        yield running


def txn(tid: str, at: datetime, *, days: int = 30, product: str = MONTHLY, **extra: Any) -> dict[str, Any]:
    return transaction(transaction_id=tid, purchase=at, expires=at + timedelta(days=days), environment=PROD,
                       product_id=product, **extra)


def note(kind: str, subtype: str | None, *, at: datetime, uuid: str, txn: dict[str, Any] | None = None,
         renewal: dict[str, Any] | None = None) -> bytes:
    return notification(CA, kind, subtype, txn=txn, renewal=renewal, environment=PROD, signed=at,
                         notification_uuid=uuid)


def send(p: Pipeline, *bodies: bytes) -> list[dict[str, Any]]:
    return [p.post("/webhooks/apple", raw, JSON) for raw in bodies]


def trial_start(at: datetime = T0) -> bytes:
    return note("SUBSCRIBED", "INITIAL_BUY", at=at, uuid="a-trial", txn=txn("t0", at, days=7, trial=True))


def converted(at: datetime = T0 + timedelta(days=7)) -> bytes:
    return note("DID_RENEW", None, at=at, uuid="a-convert", txn=txn("t1", at))


def test_trial_converted_renewal_cancellation_expiration(p: Pipeline) -> None:
    renewed = T0 + timedelta(days=37)
    send(
        p,
        trial_start(),
        converted(),
        note("DID_RENEW", None, at=renewed, uuid="a-renew", txn=txn("t2", renewed)),
        note("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", at=T0 + timedelta(days=50), uuid="a-off",
             txn=txn("t2", renewed), renewal=renewal_info(auto_renew=False, environment=PROD)),
        note("EXPIRED", "VOLUNTARY", at=T0 + timedelta(days=67), uuid="a-expired", txn=txn("t2", renewed)),
    )
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, product_id=MONTHLY, period_type="TRIAL", transaction_id="t0",
              **COMMON),
        track("rc_trial_converted_event", USER, revenue=9.99, currency="USD", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="t1", **COMMON),
        track("rc_renewal_event", USER, revenue=9.99, currency="USD", product_id=MONTHLY, period_type="NORMAL",
              transaction_id="t2", **COMMON),
        # state facts (not charges) carry no transaction id
        track("rc_cancellation_event", USER, product_id=MONTHLY, period_type="NORMAL", cancel_reason="UNSUBSCRIBE",
              **COMMON),
        track("rc_expiration_event", USER, product_id=MONTHLY, period_type="NORMAL",
              expiration_reason="UNSUBSCRIBE", **COMMON),
    ]
    assert statuses(messages) == ["trial", "active", "active", "cancelled", "expired"]
    converted_message = next(m for m in messages if m.get("event") == "rc_trial_converted_event")
    assert converted_message["properties"]["original_transaction_id"] == OTID
    assert converted_message["properties"]["country_code"] == "US"
    assert converted_message["timestamp"] == "2025-06-08T12:00:00.000Z"


def test_trial_cancelled(p: Pipeline) -> None:
    send(
        p,
        trial_start(),
        note("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", at=T0 + timedelta(days=2), uuid="a-off",
             txn=txn("t0", T0, days=7, trial=True), renewal=renewal_info(auto_renew=False, environment=PROD)),
        note("EXPIRED", "VOLUNTARY", at=T0 + timedelta(days=7), uuid="a-expired",
             txn=txn("t0", T0, days=7, trial=True)),
    )
    messages = p.relay()
    trial = {"product_id": MONTHLY, "period_type": "TRIAL", **COMMON}
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, transaction_id="t0", **trial),
        track("rc_trial_cancelled_event", USER, cancel_reason="UNSUBSCRIBE", **trial),
        track("rc_expiration_event", USER, expiration_reason="UNSUBSCRIBE", **trial),
    ]
    assert statuses(messages) == ["trial", "cancelled_trial", "expired"]


def test_billing_issue_then_recovery(p: Pipeline) -> None:
    due = T0 + timedelta(days=30)
    recovered = due + timedelta(days=3)
    send(
        p,
        note("SUBSCRIBED", "INITIAL_BUY", at=T0, uuid="a-buy", txn=txn("t1", T0)),
        note("DID_FAIL_TO_RENEW", "GRACE_PERIOD", at=due, uuid="a-fail", txn=txn("t1", T0),
             renewal=renewal_info(environment=PROD, gracePeriodExpiresDate=ms(due + timedelta(days=16)))),
        note("DID_RENEW", "BILLING_RECOVERY", at=recovered, uuid="a-recovered", txn=txn("t2", recovered)),
    )
    messages = p.relay()
    paid = {"currency": "USD", "product_id": MONTHLY, "period_type": "NORMAL", **COMMON}
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id="t1", **paid),
        track("rc_billing_issue_event", USER, product_id=MONTHLY, period_type="NORMAL", **COMMON),
        track("rc_renewal_event", USER, revenue=9.99, transaction_id="t2", **paid),
    ]
    assert statuses(messages) == ["active", "grace_period", "active"]


def test_refund_is_a_cancellation_with_negative_revenue(p: Pipeline) -> None:
    refunded = T0 + timedelta(days=3)
    send(
        p,
        note("SUBSCRIBED", "INITIAL_BUY", at=T0, uuid="a-buy", txn=txn("t1", T0)),
        note("REFUND", None, at=refunded, uuid="a-refund",
             txn=txn("t1", T0, revocationDate=ms(refunded), revocationReason=0)),
    )
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="USD", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="t1", **COMMON),
        track("rc_cancellation_event", USER, revenue=-9.99, currency="USD", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="t1", cancel_reason="CUSTOMER_SUPPORT", **COMMON),
        # issue 14: Apple revokes access with the refund of the current period
        track("rc_expiration_event", USER, product_id=MONTHLY, period_type="NORMAL",
              expiration_reason="CUSTOMER_SUPPORT", **COMMON),
    ]
    assert statuses(messages) == ["active", "active", "expired"]


def test_upgrade_is_a_product_change_and_a_new_charge(p: Pipeline) -> None:
    upgraded = T0 + timedelta(days=10)
    send(
        p,
        note("SUBSCRIBED", "INITIAL_BUY", at=T0, uuid="a-buy", txn=txn("t1", T0)),
        note("DID_CHANGE_RENEWAL_PREF", "UPGRADE", at=upgraded, uuid="a-upgrade",
             txn=txn("t2", upgraded, days=365, product=YEARLY, price=99990)),
    )
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="USD", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="t1", **COMMON),
        track("rc_product_change_event", USER, product_id=MONTHLY, new_product_id=YEARLY, period_type="NORMAL",
              **COMMON),
        track("rc_renewal_event", USER, revenue=99.99, currency="USD", product_id=YEARLY, period_type="NORMAL",
              transaction_id="t2", **COMMON),
    ]


def test_the_same_notification_twice_is_one_row_and_one_message(p: Pipeline) -> None:
    raw = trial_start()
    first, again = send(p, raw, raw)
    assert (first["result"], again["result"]) == ("new", "duplicate")
    assert again["transitions"] == []
    assert log_count(p.db_url) == 1
    assert [m["event"] for m in p.relay() if m["type"] == "track"] == ["rc_trial_started_event"]


def test_a_pair_delivered_out_of_order_settles_as_if_in_order(p: Pipeline) -> None:
    send(p, converted(), trial_start())  # Apple retries: the renewal can arrive before the purchase
    messages = p.relay()
    assert [(t["event"], t["revenue"]) for t in tracks(messages)] == [
        ("rc_trial_started_event", None),
        ("rc_trial_converted_event", 9.99),
    ]
    assert superseded(p.db_url) == 1  # what the lone renewal first derived was withdrawn before sending
