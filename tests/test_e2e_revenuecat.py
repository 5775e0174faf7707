"""RevenueCat end to end: POST /webhooks/revenuecat/{app} → log → fold → relay → fake Segment.

What a RevenueCat customer without a Segment integration gets by forwarding webhooks to subledger.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_source_revenuecat import T0, ms, rc_event
from webhooks_support import (
    RC_APP,
    Pipeline,
    log_count,
    pipeline,
    rc_body,
    rc_headers,
    statuses,
    superseded,
    track,
    tracks,
    write_root,
)

USER = "user_rc_1"
MONTHLY = "fitness_monthly"
YEARLY = "fitness_yearly"
OTID = "1000000900000001"
COMMON = {"store": "APP_STORE", "environment": "PRODUCTION"}
PATH = f"/webhooks/revenuecat/{RC_APP}"


@pytest.fixture
def p(db_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with pipeline(db_url, write_root(tmp_path)) as running:
        yield running


def rc(kind: str, eid: str, day: float, *, purchased: float | None = None, expires: float | None = None,
       **fields: Any) -> dict[str, Any]:
    """An event observed `day` days after T0 (a charge `purchased` then), expiring at `expires`."""
    base: dict[str, Any] = {
        "id": eid,
        "event_timestamp_ms": ms(T0 + timedelta(days=day, seconds=20)),
        "purchased_at_ms": ms(T0 + timedelta(days=day if purchased is None else purchased)),
    }
    if expires is not None:
        base["expiration_at_ms"] = ms(T0 + timedelta(days=expires))
    return rc_event(kind, **{**base, **fields})


def send(p: Pipeline, *events: dict[str, Any]) -> list[dict[str, Any]]:
    return [p.post(PATH, rc_body(e), rc_headers()) for e in events]


def trial(eid: str = "rc-trial") -> dict[str, Any]:
    return rc("INITIAL_PURCHASE", eid, 0, expires=7, period_type="TRIAL", price=0, price_in_purchased_currency=0,
              transaction_id="t0", original_transaction_id=OTID)


def conversion(eid: str = "rc-convert") -> dict[str, Any]:
    return rc("RENEWAL", eid, 7, expires=37, is_trial_conversion=True, transaction_id="t1",
              original_transaction_id=OTID)


def test_trial_converted_renewal_cancellation_expiration(p: Pipeline) -> None:
    send(
        p,
        trial(),
        conversion(),
        rc("RENEWAL", "rc-renew", 37, expires=67, transaction_id="t2", original_transaction_id=OTID),
        rc("CANCELLATION", "rc-cancel", 50, expires=67, cancel_reason="UNSUBSCRIBE", transaction_id="t2",
           original_transaction_id=OTID),
        rc("EXPIRATION", "rc-expire", 67, expires=67, expiration_reason="UNSUBSCRIBE", transaction_id="t2",
           original_transaction_id=OTID),
    )
    messages = p.relay()
    paid = {"currency": "EUR", "product_id": MONTHLY, "period_type": "NORMAL", **COMMON}
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, product_id=MONTHLY, period_type="TRIAL", transaction_id="t0",
              **COMMON),
        track("rc_trial_converted_event", USER, revenue=9.99, transaction_id="t1", **paid),
        track("rc_renewal_event", USER, revenue=9.99, transaction_id="t2", **paid),
        track("rc_cancellation_event", USER, product_id=MONTHLY, period_type="NORMAL", transaction_id="t2",
              cancel_reason="UNSUBSCRIBE", **COMMON),
        track("rc_expiration_event", USER, product_id=MONTHLY, period_type="NORMAL", transaction_id="t2",
              expiration_reason="UNSUBSCRIBE", **COMMON),
    ]
    assert statuses(messages) == ["trial", "active", "active", "cancelled", "expired"]
    converted = next(m for m in messages if m.get("event") == "rc_trial_converted_event")
    assert converted["properties"]["original_transaction_id"] == OTID
    assert converted["properties"]["country_code"] == "DE"
    assert converted["properties"]["is_trial_conversion"] is True


def test_trial_cancelled(p: Pipeline) -> None:
    send(
        p,
        trial(),
        rc("CANCELLATION", "rc-cancel", 2, expires=7, period_type="TRIAL", cancel_reason="UNSUBSCRIBE",
           transaction_id="t0", original_transaction_id=OTID, price=0, price_in_purchased_currency=0),
        rc("EXPIRATION", "rc-expire", 7, expires=7, period_type="TRIAL", expiration_reason="UNSUBSCRIBE",
           transaction_id="t0", original_transaction_id=OTID),
    )
    messages = p.relay()
    trial_props = {"product_id": MONTHLY, "period_type": "TRIAL", "transaction_id": "t0", **COMMON}
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, **trial_props),
        track("rc_trial_cancelled_event", USER, cancel_reason="UNSUBSCRIBE", **trial_props),
        track("rc_expiration_event", USER, expiration_reason="UNSUBSCRIBE", **trial_props),
    ]
    assert statuses(messages) == ["trial", "cancelled_trial", "expired"]


def test_billing_issue_then_recovery(p: Pipeline) -> None:
    send(
        p,
        rc("INITIAL_PURCHASE", "rc-buy", 0, expires=30, transaction_id="t1", original_transaction_id=OTID),
        rc("BILLING_ISSUE", "rc-issue", 30, expires=30, transaction_id="t1", original_transaction_id=OTID),
        rc("RENEWAL", "rc-recovered", 33, expires=63, transaction_id="t2", original_transaction_id=OTID),
    )
    messages = p.relay()
    paid = {"currency": "EUR", "product_id": MONTHLY, "period_type": "NORMAL", **COMMON}
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id="t1", **paid),
        track("rc_billing_issue_event", USER, product_id=MONTHLY, period_type="NORMAL", transaction_id="t1",
              **COMMON),
        track("rc_renewal_event", USER, revenue=9.99, transaction_id="t2", **paid),
    ]
    assert statuses(messages) == ["active", "grace_period", "active"]


def test_refund_is_a_cancellation_with_negative_revenue(p: Pipeline) -> None:
    send(
        p,
        rc("INITIAL_PURCHASE", "rc-buy", 0, expires=30, transaction_id="t1", original_transaction_id=OTID),
        rc("CANCELLATION", "rc-refund", 3, purchased=0, expires=30, cancel_reason="CUSTOMER_SUPPORT",
           price=-10.75, price_in_purchased_currency=-9.99, transaction_id="t1", original_transaction_id=OTID),
    )
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="EUR", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="t1", **COMMON),
        track("rc_cancellation_event", USER, revenue=-9.99, currency="EUR", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="t1", cancel_reason="CUSTOMER_SUPPORT", **COMMON),
    ]


def test_upgrade_is_a_product_change(p: Pipeline) -> None:
    send(
        p,
        rc("INITIAL_PURCHASE", "rc-buy", 0, expires=30, transaction_id="t1", original_transaction_id=OTID),
        rc("PRODUCT_CHANGE", "rc-upgrade", 10, expires=30, new_product_id=YEARLY, transaction_id="t1",
           original_transaction_id=OTID),
    )
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="EUR", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="t1", **COMMON),
        track("rc_product_change_event", USER, product_id=MONTHLY, new_product_id=YEARLY, period_type="NORMAL",
              transaction_id="t1", **COMMON),
    ]


def test_the_same_event_twice_is_one_row_and_one_message(p: Pipeline) -> None:
    first, again = send(p, trial(), trial())
    assert (first["result"], again["result"]) == ("new", "duplicate")
    assert log_count(p.db_url) == 1
    assert [m["event"] for m in p.relay() if m["type"] == "track"] == ["rc_trial_started_event"]


def test_a_pair_delivered_out_of_order_settles_as_if_in_order(p: Pipeline) -> None:
    send(p, conversion(), trial())
    messages = p.relay()
    assert [(t["event"], t["revenue"]) for t in tracks(messages)] == [
        ("rc_trial_started_event", None),
        ("rc_trial_converted_event", 9.99),
    ]
    # issue 14: with no prior state RevenueCat's is_trial_conversion decides, so the early conversion
    # is already right and the late trial start supersedes nothing
    assert superseded(p.db_url) == 0


def test_transfer_sends_the_subscriptions_later_messages_to_the_receiver(p: Pipeline) -> None:
    anon = "$RCAnonymousID:8b7f3a"
    moved = rc_event("TRANSFER", id="rc-transfer", event_timestamp_ms=ms(T0 + timedelta(days=1)),
                     transferred_from=[anon], transferred_to=["$RCAnonymousID:ffff", "user_real"])
    for name in ("app_user_id", "original_app_user_id", "original_transaction_id", "transaction_id"):
        moved.pop(name)
    first = send(p, trial() | {"app_user_id": anon}, moved)
    assert first[1]["transitions"] == []
    again = send(p, moved)  # a retried TRANSFER re-applies the same links: harmless
    assert again[0]["result"] == "duplicate"
    send(p, conversion() | {"app_user_id": anon})
    messages = p.relay()
    assert [(t["event"], t["userId"]) for t in tracks(messages)] == [
        ("rc_trial_started_event", anon),
        ("rc_trial_converted_event", "user_real"),
    ]
    converted = [m for m in messages if m["type"] == "identify" and m.get("userId") == "user_real"]
    assert anon in converted[0]["traits"]["aliases"]
    # the transfer was told at once, as `POST /v1/subscribers/{id}/links` tells a link: one identify
    # with the receiver and the subscription's status, before the next lifecycle event
    paired = {m["messageId"].removesuffix(".t") + ".i" for m in messages if m["type"] == "track"}
    told = [m for m in converted if m["messageId"] not in paired]
    assert len(told) == 1 and told[0]["traits"]["subscription_status"] == "trial", converted


# -- issue 14: what RevenueCat states beyond the lifecycle fact --------------------------------------


def identifies(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((m for m in messages if m["type"] == "identify"), key=lambda m: m["timestamp"])


def test_identify_carries_revenuecat_aliases_and_original_app_user_id(p: Pipeline) -> None:
    send(p, rc("INITIAL_PURCHASE", "rc-buy", 0, expires=30, transaction_id="t1", original_transaction_id=OTID,
               aliases=["$RCAnonymousID:8b7f3a", USER, "legacy-42"], original_app_user_id="$RCAnonymousID:0001"))
    (identify,) = identifies(p.relay())
    assert identify["userId"] == USER
    assert identify["traits"]["aliases"] == ["$RCAnonymousID:8b7f3a", USER, "legacy-42", "$RCAnonymousID:0001"]


def test_source_take_home_is_used_for_revenue_after_commission(db_url: str, tmp_path: Path) -> None:
    with pipeline(db_url, write_root(tmp_path), destination_settings={"revenue_mode": "after_commission"}) as run:
        send(run,
             rc("INITIAL_PURCHASE", "rc-gb", 0, expires=30, transaction_id="t1", original_transaction_id=OTID,
                currency="GBP", price_in_purchased_currency=9.99, takehome_percentage=0.5833),
             rc("INITIAL_PURCHASE", "rc-est", 0, expires=30, transaction_id="t9", original_transaction_id="otid-2",
                currency="GBP", price_in_purchased_currency=9.99, takehome_percentage=None))
        by_txn = {m["properties"]["transaction_id"]: m["properties"] for m in run.relay() if m["type"] == "track"}
    # the source's 0.5833, not subledger's App Store first-year estimate of 0.70
    assert (by_txn["t1"]["revenue"], by_txn["t1"]["commission_source"]) == (5.8272, "source")
    assert (by_txn["t9"]["revenue"], by_txn["t9"]["commission_source"]) == (6.993, "estimate")


def test_first_renewal_flagged_as_trial_conversion_is_a_trial_conversion(p: Pipeline) -> None:
    """The webhook was pointed at subledger after the trial began: no prior state, the flag decides."""
    send(p, conversion())
    messages = p.relay()
    assert [(t["event"], t["revenue"], t["period_type"]) for t in tracks(messages)] == [
        ("rc_trial_converted_event", 9.99, "NORMAL")]
    converted = next(m for m in messages if m["type"] == "track")
    assert converted["properties"]["is_trial_conversion"] is True
    assert statuses(messages) == ["active"]


def test_refund_track_names_the_refunded_purchase_and_keeps_the_subscription(p: Pipeline) -> None:
    purchased = T0 + timedelta(days=1)
    send(p, rc("CANCELLATION", "rc-refund", 3, purchased=1, expires=31, cancel_reason="CUSTOMER_SUPPORT",
               price=-10.75, price_in_purchased_currency=-9.99, transaction_id="t1", original_transaction_id=OTID,
               product_id=YEARLY, period_type="INTRO"))
    (refund,) = [m for m in p.relay() if m["type"] == "track"]
    props = refund["properties"]
    assert refund["event"] == "rc_cancellation_event"
    assert (props["product_id"], props["purchased_at"], props["period_type"], props["original_transaction_id"],
            props["revenue"], props["cancel_reason"]) == (
        YEARLY, int(purchased.timestamp()), "INTRO", OTID, -9.99, "CUSTOMER_SUPPORT")


def test_refund_leaves_the_subscription_active_until_revenuecat_expires_it(p: Pipeline) -> None:
    send(
        p,
        rc("INITIAL_PURCHASE", "rc-buy", 0, expires=30, transaction_id="t1", original_transaction_id=OTID),
        rc("CANCELLATION", "rc-refund", 3, purchased=0, expires=30, cancel_reason="CUSTOMER_SUPPORT",
           price=-10.75, price_in_purchased_currency=-9.99, transaction_id="t1", original_transaction_id=OTID),
        rc("EXPIRATION", "rc-expire", 3.5, expires=3, expiration_reason="CUSTOMER_SUPPORT", transaction_id="t1",
           original_transaction_id=OTID),
    )
    messages = p.relay()
    assert [t["event"] for t in tracks(messages)] == [
        "rc_initial_purchase_event", "rc_cancellation_event", "rc_expiration_event"]
    assert statuses(messages) == ["active", "active", "expired"]
