"""Stripe adapter: Stripe-Signature like Stripe computes it, both API shapes, the mapping table."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, MalformedPayload, PayloadRejected
from subledger.core.events import Environment, EventType, PeriodType, Reason, Source, Store
from subledger.core.lifecycle import TransitionKind, fold
from subledger.core.sources import Notification
from subledger.core.sources.stripe import (
    StripeConfig,
    amount,
    is_basil,
    map_event,
    parse_unverified,
    parse_webhook,
    signature_header,
    stream_key,
    verify_signature,
)

SECRET = "whsec_test_secret_one"
ROLLED = "whsec_test_secret_two"
APP = "com.example.fitness.web"
USER = "user_stripe_1"
SUB = "sub_1RKxTrialFitness01"
CUSTOMER = "cus_SFitness001"
PRICE = "price_1RKxFitnessMonthly"
YEARLY = "price_1RKxFitnessYearly"
PRODUCT = "prod_SFitnessPro"
BASIL = "2025-03-31.basil"
ACACIA = "2024-12-18.acacia"
T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
NOW = datetime(2025, 7, 20, 12, 0, tzinfo=UTC)
CONFIG = StripeConfig(app_id=APP, endpoint_secrets=(SECRET,))


def ts(when: datetime) -> int:
    return int(when.timestamp())


# --- payload builders (also used to write app/samples/stripe_lifecycle.ndjson) -----------------


def price_object(price_id: str = PRICE, unit_amount: int = 999, currency: str = "usd") -> dict[str, Any]:
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "currency": currency,
        "lookup_key": "fitness_pro_monthly" if price_id == PRICE else "fitness_pro_yearly",
        "product": PRODUCT,
        "recurring": {"interval": "month" if price_id == PRICE else "year", "interval_count": 1},
        "type": "recurring",
        "unit_amount": unit_amount,
    }


def subscription(
    *,
    status: str = "active",
    basil: bool = True,
    start: datetime = T0,
    period_start: datetime = T0,
    period_end: datetime = T0 + timedelta(days=14),
    trial_end: datetime | None = None,
    cancel_at_period_end: bool = False,
    cancel_at: datetime | None = None,
    canceled_at: datetime | None = None,
    ended_at: datetime | None = None,
    cancellation_reason: str | None = None,
    price_id: str = PRICE,
    metadata: dict[str, str] | None = None,
    latest_invoice: str = "in_1RKxFitness0001",
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": "si_SFitness001",
        "object": "subscription_item",
        "created": ts(start),
        "metadata": {},
        "price": price_object(price_id),
        "quantity": 1,
        "subscription": SUB,
    }
    sub: dict[str, Any] = {
        "id": SUB,
        "object": "subscription",
        "billing_cycle_anchor": ts(period_start),
        "cancel_at": None if cancel_at is None else ts(cancel_at),
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": None if canceled_at is None else ts(canceled_at),
        "cancellation_details": {"comment": None, "feedback": None, "reason": cancellation_reason},
        "collection_method": "charge_automatically",
        "created": ts(start),
        "currency": "usd",
        "customer": CUSTOMER,
        "ended_at": None if ended_at is None else ts(ended_at),
        "items": {"object": "list", "data": [item], "has_more": False, "total_count": 1},
        "latest_invoice": latest_invoice,
        "livemode": True,
        "metadata": {"app_user_id": USER} if metadata is None else metadata,
        "start_date": ts(start),
        "status": status,
        "trial_end": None if trial_end is None else ts(trial_end),
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": None if trial_end is None else ts(start),
    }
    if basil:
        item["current_period_start"] = ts(period_start)
        item["current_period_end"] = ts(period_end)
    else:
        sub["current_period_start"] = ts(period_start)
        sub["current_period_end"] = ts(period_end)
        sub["plan"] = {"id": price_id, "object": "plan", "product": PRODUCT}
    return sub


def invoice(
    *,
    invoice_id: str = "in_1RKxFitness0002",
    billing_reason: str = "subscription_cycle",
    amount_paid: int = 999,
    currency: str = "usd",
    basil: bool = True,
    period_start: datetime = T0 + timedelta(days=14),
    period_end: datetime = T0 + timedelta(days=44),
    created: datetime = T0 + timedelta(days=14),
    attempt_count: int = 1,
    proration: bool = False,
    price_id: str = PRICE,
    status: str = "paid",
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta = {"app_user_id": USER} if metadata is None else metadata
    line: dict[str, Any] = {
        "id": "il_1RKxFitness0001",
        "object": "line_item",
        "amount": amount_paid,
        "currency": currency,
        "description": "1 × Fitness Pro (at $9.99 / month)",  # noqa: RUF001 - as Stripe writes it
        "metadata": meta,
        "period": {"start": ts(period_start), "end": ts(period_end)},
        "quantity": 1,
    }
    inv: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "amount_due": amount_paid,
        "amount_paid": amount_paid,
        "amount_remaining": 0,
        "attempt_count": attempt_count,
        "attempted": True,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "created": ts(created),
        "currency": currency,
        "customer": CUSTOMER,
        "lines": {"object": "list", "data": [line], "has_more": False, "total_count": 1},
        "livemode": True,
        "metadata": {},
        "number": "FIT-0001-" + invoice_id[-4:],
        "period_end": ts(period_start),
        "period_start": ts(period_start),
        "status": status,
        "status_transitions": {"finalized_at": ts(created), "paid_at": ts(created + timedelta(hours=1))},
        "subtotal": amount_paid,
        "total": amount_paid,
    }
    if basil:
        line["parent"] = {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": proration,
                "proration_details": {"credited_items": None},
                "subscription": SUB,
                "subscription_item": "si_SFitness001",
            },
        }
        line["pricing"] = {
            "type": "price_details",
            "price_details": {"price": price_id, "product": PRODUCT},
            "unit_amount_decimal": str(amount_paid),
        }
        inv["parent"] = {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": meta, "subscription": SUB},
        }
    else:
        line.update(
            {
                "type": "subscription",
                "subscription": SUB,
                "subscription_item": "si_SFitness001",
                "proration": proration,
                "price": price_object(price_id),
                "plan": {"id": price_id, "object": "plan", "product": PRODUCT},
            }
        )
        inv.update(
            {
                "subscription": SUB,
                "subscription_details": {"metadata": meta},
                "paid": status == "paid",
                "payment_intent": "pi_3RKxFitness0001",
                "charge": "ch_3RKxFitness0001",
            }
        )
    return inv


def event(
    kind: str,
    obj: dict[str, Any],
    *,
    event_id: str = "evt_1RKxFitness0001",
    created: datetime = T0,
    api_version: str = BASIL,
    previous: dict[str, Any] | None = None,
    livemode: bool = True,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": event_id,
        "object": "event",
        "api_version": api_version,
        "created": ts(created),
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }


def encode(evt: dict[str, Any]) -> bytes:
    return json.dumps(evt, separators=(",", ":")).encode()


def stripe_sign(raw: bytes, secret: str, timestamp: int) -> str:
    """Stripe's scheme, written out: v1 = hex HMAC-SHA256(secret, f"{t}.{body}")."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def mapped(evt: dict[str, Any], **kwargs: Any) -> Notification:
    raw = encode(evt)
    return parse_webhook(raw, stripe_sign(raw, SECRET, ts(NOW)), CONFIG, NOW, **kwargs)


# --- signature ---------------------------------------------------------------------------------

RAW = encode(event("customer.subscription.trial_will_end", subscription(status="trialing")))


def test_signature_as_stripe_computes_it_verifies() -> None:
    assert parse_webhook(RAW, stripe_sign(RAW, SECRET, ts(NOW)), CONFIG, NOW).external_id == "evt_1RKxFitness0001"


def test_library_header_matches_the_written_out_scheme() -> None:
    assert signature_header(RAW, SECRET, 1700000000) == stripe_sign(RAW, SECRET, 1700000000)


def test_any_of_several_v1_values_may_match() -> None:
    good = stripe_sign(RAW, SECRET, ts(NOW)).split(",")[1]
    wrong = stripe_sign(RAW, "whsec_other", ts(NOW)).split(",")[1]
    header = f"t={ts(NOW)},{wrong},{good},v0=deadbeef"
    verify_signature(RAW, header, CONFIG, NOW)


def test_any_configured_secret_may_match_during_a_roll() -> None:
    rolled = StripeConfig(app_id=APP, endpoint_secrets=(ROLLED, SECRET))
    verify_signature(RAW, stripe_sign(RAW, SECRET, ts(NOW)), rolled, NOW)
    verify_signature(RAW, stripe_sign(RAW, ROLLED, ts(NOW)), rolled, NOW)


def test_too_old_timestamp_is_rejected_with_the_passed_now() -> None:
    old = ts(NOW) - 301
    with pytest.raises(BadSignature) as err:
        verify_signature(RAW, stripe_sign(RAW, SECRET, old), CONFIG, NOW)
    assert "tolerance" in err.value.reason
    verify_signature(RAW, stripe_sign(RAW, SECRET, ts(NOW) - 299), CONFIG, NOW)
    # the same header is fine when `now` says it is recent: no wall clock involved
    verify_signature(RAW, stripe_sign(RAW, SECRET, old), CONFIG, NOW - timedelta(seconds=10))


def test_tolerance_zero_disables_the_age_check() -> None:
    lax = StripeConfig(app_id=APP, endpoint_secrets=(SECRET,), tolerance=0)
    verify_signature(RAW, stripe_sign(RAW, SECRET, 1), lax, NOW)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=abc,v1=00",
        "v1=00",
        f"t={ts(NOW)}",
        f"t={ts(NOW)},v0=00",
        stripe_sign(RAW, "whsec_wrong", ts(NOW)),
        stripe_sign(RAW + b" ", SECRET, ts(NOW)),
    ],
)
def test_bad_signatures_are_rejected(header: str | None) -> None:
    with pytest.raises(BadSignature) as err:
        parse_webhook(RAW, header, CONFIG, NOW)
    assert err.value.field == "Stripe-Signature"


def test_tampered_body_is_rejected() -> None:
    header = stripe_sign(RAW, SECRET, ts(NOW))
    with pytest.raises(BadSignature):
        parse_webhook(RAW.replace(b"trialing", b"active"), header, CONFIG, NOW)


def test_non_utf8_body_is_malformed() -> None:
    raw = b"\xff" + RAW
    with pytest.raises(MalformedPayload):
        parse_webhook(raw, stripe_sign(raw, SECRET, ts(NOW)), CONFIG, NOW)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        StripeConfig(app_id=APP, endpoint_secrets=())
    with pytest.raises(ConfigError):
        StripeConfig(app_id="", endpoint_secrets=(SECRET,))
    with pytest.raises(ConfigError):
        StripeConfig(app_id=APP, endpoint_secrets=(SECRET,), tolerance=-1)
    assert StripeConfig(app_id=APP, endpoint_secrets=SECRET).endpoint_secrets == (SECRET,)  # type: ignore[arg-type]


# --- mapping -----------------------------------------------------------------------------------

SHAPES = pytest.mark.parametrize(("basil", "api_version"), [(True, BASIL), (False, ACACIA)])


@SHAPES
def test_trialing_subscription_created_is_trial_purchase(basil: bool, api_version: str) -> None:
    sub = subscription(status="trialing", trial_end=T0 + timedelta(days=14), basil=basil)
    n = mapped(event("customer.subscription.created", sub, api_version=api_version))
    (e,) = n.events
    assert (e.type, e.period_type, e.product_id, e.price, e.currency) == (
        EventType.PURCHASE,
        PeriodType.TRIAL,
        PRICE,
        Decimal(0),
        "USD",
    )
    assert (e.subscription_id, e.app_user_id, e.app_id) == (SUB, USER, APP)
    assert (e.store, e.source, e.environment) == (Store.STRIPE, Source.STRIPE, Environment.PRODUCTION)
    assert e.expires_at == T0 + timedelta(days=14)
    assert e.occurred_at == T0
    assert e.attributes["stripe_product"] == PRODUCT
    assert n.external_id == e.id == "evt_1RKxFitness0001"


def test_active_subscription_created_is_stored_only_the_invoice_states_the_purchase() -> None:
    n = mapped(event("customer.subscription.created", subscription(status="active")))
    assert n.events == ()
    assert n.subscription_key == stream_key(APP, SUB)


@SHAPES
def test_first_paid_invoice_is_purchase(basil: bool, api_version: str) -> None:
    inv = invoice(
        billing_reason="subscription_create", basil=basil, period_start=T0, period_end=T0 + timedelta(days=30)
    )
    (e,) = mapped(event("invoice.paid", inv, api_version=api_version)).events
    assert (e.type, e.period_type, e.price, e.currency, e.product_id) == (
        EventType.PURCHASE,
        PeriodType.NORMAL,
        Decimal("9.99"),
        "USD",
        PRICE,
    )
    assert (e.subscription_id, e.app_user_id, e.transaction_id) == (SUB, USER, "in_1RKxFitness0002")
    assert e.expires_at == T0 + timedelta(days=30)


@SHAPES
def test_zero_first_invoice_of_a_trial_is_stored_only(basil: bool, api_version: str) -> None:
    inv = invoice(billing_reason="subscription_create", amount_paid=0, basil=basil)
    n = mapped(event("invoice.paid", inv, api_version=api_version))
    assert n.events == ()
    assert n.subscription_key == stream_key(APP, SUB)


@SHAPES
def test_cycle_invoice_paid_is_renewal(basil: bool, api_version: str) -> None:
    (e,) = mapped(event("invoice.paid", invoice(basil=basil), api_version=api_version)).events
    assert (e.type, e.price, e.expires_at) == (EventType.RENEWAL, Decimal("9.99"), T0 + timedelta(days=44))


@SHAPES
def test_payment_succeeded_states_the_same_charge(basil: bool, api_version: str) -> None:
    a = mapped(event("invoice.paid", invoice(basil=basil), api_version=api_version, event_id="evt_a")).events[0]
    b = mapped(
        event("invoice.payment_succeeded", invoice(basil=basil), api_version=api_version, event_id="evt_b")
    ).events[0]
    assert a.transaction_id == b.transaction_id  # the fold applies one charge once
    kinds = [t.kind for t in fold([a, b]).transitions]
    assert kinds == [TransitionKind.RENEWAL]


def test_retried_cycle_invoice_is_billing_recovered() -> None:
    (e,) = mapped(event("invoice.paid", invoice(attempt_count=3))).events
    assert e.type is EventType.BILLING_RECOVERED


@SHAPES
def test_subscription_update_invoice_without_proration_is_renewal(basil: bool, api_version: str) -> None:
    inv = invoice(billing_reason="subscription_update", basil=basil)
    assert mapped(event("invoice.paid", inv, api_version=api_version)).events[0].type is EventType.RENEWAL
    prorated = invoice(billing_reason="subscription_update", basil=basil, proration=True)
    assert mapped(event("invoice.paid", prorated, api_version=api_version)).events == ()


def test_one_off_invoice_is_stored_only() -> None:
    inv = invoice(billing_reason="manual", basil=True)
    inv["parent"] = None
    inv["lines"]["data"][0]["parent"] = {"type": "invoice_item_details"}
    n = mapped(event("invoice.paid", inv))
    assert (n.events, n.subscription_key) == ((), None)


@SHAPES
def test_payment_failed_is_billing_issue(basil: bool, api_version: str) -> None:
    inv = invoice(basil=basil, status="open", amount_paid=0)
    (e,) = mapped(event("invoice.payment_failed", inv, api_version=api_version)).events
    assert (e.type, e.subscription_id, e.app_user_id) == (EventType.BILLING_ISSUE, SUB, USER)


@SHAPES
def test_cancel_at_period_end_toggles_auto_renew(basil: bool, api_version: str) -> None:
    on = subscription(basil=basil, cancel_at_period_end=True, cancellation_reason="cancellation_requested")
    (e,) = mapped(
        event("customer.subscription.updated", on, api_version=api_version, previous={"cancel_at_period_end": False})
    ).events
    assert (e.type, e.reason) == (EventType.AUTO_RENEW_DISABLED, Reason.UNSUBSCRIBE)
    off = subscription(basil=basil)
    (e,) = mapped(
        event("customer.subscription.updated", off, api_version=api_version, previous={"cancel_at_period_end": True})
    ).events
    assert e.type is EventType.AUTO_RENEW_ENABLED


def test_cancel_at_date_set_and_cleared() -> None:
    on = subscription(cancel_at=T0 + timedelta(days=30))
    (e,) = mapped(event("customer.subscription.updated", on, previous={"cancel_at": None})).events
    assert e.type is EventType.AUTO_RENEW_DISABLED
    (e,) = mapped(event("customer.subscription.updated", subscription(), previous={"cancel_at": ts(T0)})).events
    assert e.type is EventType.AUTO_RENEW_ENABLED


def test_unrelated_update_is_stored_only() -> None:
    prev = {"status": "trialing", "latest_invoice": "in_old", "items": subscription()["items"]}
    n = mapped(event("customer.subscription.updated", subscription(), previous=prev))
    assert n.events == ()
    assert n.subscription_key == stream_key(APP, SUB)


@SHAPES
def test_price_change_is_product_change(basil: bool, api_version: str) -> None:
    prev = {"items": subscription(basil=basil)["items"]}
    if not basil:
        prev["plan"] = {"id": PRICE}
    now = subscription(basil=basil, price_id=YEARLY)
    (e,) = mapped(event("customer.subscription.updated", now, api_version=api_version, previous=prev)).events
    assert (e.type, e.product_id, e.new_product_id) == (EventType.PRODUCT_CHANGE, PRICE, YEARLY)


def test_deleted_is_expiration() -> None:
    sub = subscription(status="canceled", cancel_at_period_end=True, cancellation_reason="cancellation_requested")
    (e,) = mapped(event("customer.subscription.deleted", sub)).events
    assert (e.type, e.reason) == (EventType.EXPIRATION, Reason.UNSUBSCRIBE)


def test_deleted_after_failed_payments_is_billing_error_expiration() -> None:
    sub = subscription(status="canceled", cancellation_reason="payment_failed")
    (e,) = mapped(event("customer.subscription.deleted", sub)).events
    assert (e.type, e.reason) == (EventType.EXPIRATION, Reason.BILLING_ERROR)


def test_immediate_cancel_states_the_cancellation_and_the_end() -> None:
    sub = subscription(status="canceled", cancellation_reason="cancellation_requested", canceled_at=T0)
    n = mapped(event("customer.subscription.deleted", sub, event_id="evt_del"))
    assert [(e.id, e.type) for e in n.events] == [
        ("evt_del", EventType.AUTO_RENEW_DISABLED),
        ("evt_del#1", EventType.EXPIRATION),
    ]


def test_pause_and_resume() -> None:
    assert mapped(event("customer.subscription.paused", subscription(status="paused"))).events[0].type is (
        EventType.PAUSED
    )
    assert mapped(event("customer.subscription.resumed", subscription())).events[0].type is EventType.RESUMED


def charge(*, invoice_ref: Any = "in_1RKxFitness0002", refunded: int = 999, currency: str = "usd") -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "ch_3RKxFitness0001",
        "object": "charge",
        "amount": 999,
        "amount_refunded": refunded,
        "currency": currency,
        "customer": CUSTOMER,
        "metadata": {},
        "payment_intent": "pi_3RKxFitness0001",
        "refunded": refunded == 999,
    }
    if invoice_ref is not None:
        obj["invoice"] = invoice_ref
    return obj


def test_refund_linked_by_lookup() -> None:
    seen: list[str] = []

    def lookup(ref: str) -> str | None:
        seen.append(ref)
        return SUB if ref == "in_1RKxFitness0002" else None

    (e,) = mapped(event("charge.refunded", charge()), subscription_for=lookup).events
    assert (e.type, e.price, e.currency, e.subscription_id, e.transaction_id) == (
        EventType.REFUND,
        Decimal("-9.99"),
        "USD",
        SUB,
        "in_1RKxFitness0002",
    )
    assert seen == ["in_1RKxFitness0002"]


def test_basil_refund_links_through_payment_intent() -> None:
    lookup = {"pi_3RKxFitness0001": SUB}.get
    (e,) = mapped(event("charge.refunded", charge(invoice_ref=None)), subscription_for=lookup).events
    assert (e.subscription_id, e.transaction_id) == (SUB, "ch_3RKxFitness0001")


def test_refund_with_expanded_invoice_needs_no_lookup() -> None:
    expanded = {"id": "in_1RKxFitness0002", "object": "invoice", "subscription": SUB}
    (e,) = mapped(event("charge.refunded", charge(invoice_ref=expanded), api_version=ACACIA)).events
    assert e.subscription_id == SUB


def test_unlinkable_refund_is_stored_only() -> None:
    n = mapped(event("charge.refunded", charge()))
    assert (n.events, n.kind) == ((), "charge.refunded")


def refund_object(refund_id: str, minor: int, created: datetime, *, status: str = "succeeded",
                  charge_ref: Any = "ch_3RKxFitness0001") -> dict[str, Any]:
    """A Stripe Refund object, as `refund.created` and an expanded `charge.refunds` carry it."""
    return {"id": refund_id, "object": "refund", "amount": minor, "charge": charge_ref, "currency": "usd",
            "created": ts(created), "metadata": {}, "payment_intent": "pi_3RKxFitness0001", "status": status}


def with_refunds(obj: dict[str, Any], *refunds: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "refunds": {"object": "list", "data": list(refunds), "has_more": False,
                               "total_count": len(refunds)}}


LINKED = {"in_1RKxFitness0002": SUB, "ch_3RKxFitness0001": SUB}.get


def test_second_partial_refund_is_the_growth_of_amount_refunded_with_its_own_id() -> None:
    first = mapped(event("charge.refunded", charge(refunded=250), event_id="evt_r1",
                         previous={"amount_refunded": 0}), subscription_for=LINKED).events
    second = mapped(event("charge.refunded", charge(refunded=499), event_id="evt_r2",
                          previous={"amount_refunded": 250}), subscription_for=LINKED).events
    assert [(e.price, e.refund_id, e.transaction_id) for e in (*first, *second)] == [
        (Decimal("-2.50"), "ch_3RKxFitness0001:250", "in_1RKxFitness0002"),
        (Decimal("-2.49"), "ch_3RKxFitness0001:499", "in_1RKxFitness0002"),
    ]


def test_a_charge_refunded_that_adds_nothing_is_stored_only() -> None:
    n = mapped(event("charge.refunded", charge(refunded=250), previous={"amount_refunded": 250}),
               subscription_for=LINKED)
    assert (n.events, n.kind) == ((), "charge.refunded")


def test_expanded_refunds_are_stated_one_by_one_by_their_own_ids() -> None:
    obj = with_refunds(charge(refunded=499), refund_object("re_2", 249, T0 + timedelta(days=2)),
                       refund_object("re_1", 250, T0 + timedelta(days=1)),
                       refund_object("re_3", 100, T0 + timedelta(days=3), status="failed"))
    previous = with_refunds({"amount_refunded": 250}, refund_object("re_1", 250, T0 + timedelta(days=1)))
    (only,) = mapped(event("charge.refunded", obj, previous=previous), subscription_for=LINKED).events
    assert (only.refund_id, only.price, only.attributes["stripe_refund"]) == ("re_2", Decimal("-2.49"), "re_2")
    both = mapped(event("charge.refunded", obj), subscription_for=LINKED).events  # no previous list: all of them
    assert [e.refund_id for e in both] == ["re_1", "re_2"]


def test_refund_created_is_the_refund_linked_through_its_charge() -> None:
    seen: list[str] = []

    def lookup(ref: str) -> str | None:
        seen.append(ref)
        return SUB if ref == "ch_3RKxFitness0001" else None

    (e,) = mapped(event("refund.created", refund_object("re_9", 250, T0)), subscription_for=lookup).events
    assert (e.type, e.price, e.currency, e.refund_id, e.transaction_id, e.subscription_id) == (
        EventType.REFUND, Decimal("-2.50"), "USD", "re_9", "ch_3RKxFitness0001", SUB)
    assert seen == ["pi_3RKxFitness0001", "ch_3RKxFitness0001"]
    for kind in ("charge.refund.updated", "refund.updated"):
        (updated,) = mapped(event(kind, refund_object("re_9", 250, T0)), subscription_for=lookup).events
        assert updated.refund_id == "re_9"
    failed = mapped(event("refund.updated", refund_object("re_9", 250, T0, status="failed")), subscription_for=lookup)
    assert failed.events == ()


def test_one_refund_carried_by_two_events_folds_once_whichever_comes_first() -> None:
    start = invoice(invoice_id="in_1RKxFitness0002", billing_reason="subscription_create", created=T0)
    purchase = mapped(event("invoice.paid", start, event_id="evt_start")).events
    created = mapped(event("refund.created", refund_object("re_1", 250, T0 + timedelta(days=1)),
                           event_id="evt_b", created=T0 + timedelta(days=1)), subscription_for=LINKED).events
    listed = mapped(event("charge.refunded", with_refunds(charge(refunded=250),
                                                          refund_object("re_1", 250, T0 + timedelta(days=1))),
                          event_id="evt_a", created=T0 + timedelta(days=1)), subscription_for=LINKED).events
    folds = [fold([*purchase, *created, *listed]), fold([*purchase, *created]), fold([*purchase, *listed])]
    refunds = [[t for t in f.transitions if t.kind is TransitionKind.CANCELLATION] for f in folds]
    assert [len(r) for r in refunds] == [1, 1, 1]
    assert len({r[0].id for r in refunds}) == 1  # the refund is the cause: one id, whichever event carried it
    assert all(f.state.auto_renew and f.state.status is not None and f.state.status.value == "active"
               for f in folds)


def test_informational_events_are_stored_only() -> None:
    for kind in ("customer.subscription.trial_will_end", "invoice.created", "invoice.upcoming", "customer.updated"):
        assert mapped(event(kind, invoice() if kind.startswith("invoice") else subscription())).events == ()


def test_test_mode_is_sandbox() -> None:
    sub = subscription(status="trialing", trial_end=T0 + timedelta(days=14))
    e = mapped(event("customer.subscription.created", sub, livemode=False)).events[0]
    assert e.environment is Environment.SANDBOX


def test_metadata_key_is_configurable_and_optional() -> None:
    cfg = StripeConfig(app_id=APP, endpoint_secrets=(SECRET,), metadata_key="uid")
    sub = subscription(status="trialing", trial_end=T0 + timedelta(days=3), metadata={"uid": "u-9"})
    assert map_event(event("customer.subscription.created", sub), cfg).events[0].app_user_id == "u-9"
    anonymous = subscription(status="trialing", trial_end=T0 + timedelta(days=3), metadata={})
    assert map_event(event("customer.subscription.created", anonymous), cfg).events[0].app_user_id is None


def test_amount_uses_currency_exponent() -> None:
    assert amount(999, "usd", "x") == Decimal("9.99")
    assert amount(500, "JPY", "x") == Decimal(500)
    assert amount(1234, "kwd", "x") == Decimal("1.234")
    assert is_basil("2025-03-31.basil") and is_basil("2026-01-28.clover")
    assert not is_basil("2024-06-20") and not is_basil(None)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"[]", MalformedPayload),
        (b"nope", MalformedPayload),
        (b'{"object": "v2.core.event", "id": "evt_x"}', MalformedPayload),
        (b'{"object": "event", "type": "x", "created": 1, "data": {"object": {}}}', InvalidEvent),
        (b'{"object": "event", "id": "e", "type": "x", "created": "soon", "data": {"object": {}}}', InvalidEvent),
        (b'{"object": "event", "id": "e", "type": "x", "created": 1, "data": {}}', MalformedPayload),
    ],
)
def test_malformed_events_are_rejected(raw: bytes, error: type[PayloadRejected]) -> None:
    with pytest.raises(error):
        parse_unverified(raw, CONFIG)


# --- the bundled demo lifecycle ----------------------------------------------------------------


def sample_lines() -> list[bytes]:
    text = resources.files("subledger.app.samples").joinpath("stripe_lifecycle.ndjson").read_text()
    return [line.encode() for line in text.splitlines() if line.strip()]


def test_bundled_lifecycle_folds_to_the_rc_transitions() -> None:
    lines = sample_lines()
    notes = [parse_unverified(line, CONFIG) for line in lines]
    assert all(n.app_id == APP for n in notes)
    events = [e for n in notes for e in n.events]
    assert {e.app_user_id for e in events} == {USER}
    assert len({n.external_id for n in notes}) == len(notes)
    result = fold(events)
    assert [t.kind for t in result.transitions] == [
        TransitionKind.TRIAL_STARTED,
        TransitionKind.TRIAL_CONVERTED,
        TransitionKind.RENEWAL,
        TransitionKind.CANCELLATION,
        TransitionKind.EXPIRATION,
    ]
    assert result.transitions[1].price == Decimal("9.99")


def test_bundled_lifecycle_verifies_when_signed() -> None:
    for line in sample_lines():
        header = signature_header(line, SECRET, ts(NOW))
        assert parse_webhook(line, header, CONFIG, NOW).source is Source.STRIPE


def build_sample_lifecycle() -> list[dict[str, Any]]:
    """The events of app/samples/stripe_lifecycle.ndjson (regenerate with `python tests/test_source_stripe.py`)."""
    trial_end = T0 + timedelta(days=14)
    month2 = trial_end + timedelta(days=31)
    month3 = month2 + timedelta(days=30)
    trialing = subscription(
        status="trialing", trial_end=trial_end, period_end=trial_end, latest_invoice="in_1RKxFitnessTrl00"
    )
    active1 = subscription(period_start=trial_end, period_end=month2, latest_invoice="in_1RMFitnessConv01")
    active2 = subscription(period_start=month2, period_end=month3, latest_invoice="in_1RUFitnessRenw02")
    cancelling = subscription(
        period_start=month2,
        period_end=month3,
        latest_invoice="in_1RUFitnessRenw02",
        cancel_at_period_end=True,
        cancel_at=month3,
        canceled_at=month2 + timedelta(days=5),
        cancellation_reason="cancellation_requested",
    )
    ended = subscription(
        status="canceled",
        period_start=month2,
        period_end=month3,
        latest_invoice="in_1RUFitnessRenw02",
        cancel_at_period_end=True,
        cancel_at=month3,
        canceled_at=month2 + timedelta(days=5),
        ended_at=month3,
        cancellation_reason="cancellation_requested",
    )
    zero = invoice(
        invoice_id="in_1RKxFitnessTrl00",
        billing_reason="subscription_create",
        amount_paid=0,
        period_start=T0,
        period_end=trial_end,
        created=T0,
    )
    conversion = invoice(invoice_id="in_1RMFitnessConv01", period_start=trial_end, period_end=month2, created=trial_end)
    renewal = invoice(invoice_id="in_1RUFitnessRenw02", period_start=month2, period_end=month3, created=month2)
    previous_trial = {"status": "trialing", "latest_invoice": "in_1RKxFitnessTrl00", "items": trialing["items"]}
    previous_cycle = {"latest_invoice": "in_1RMFitnessConv01", "items": active1["items"]}
    return [
        event("customer.subscription.created", trialing, event_id="evt_1RKxTrialStart0001", created=T0),
        event("invoice.paid", zero, event_id="evt_1RKxTrialInvoice02", created=T0),
        event(
            "customer.subscription.updated",
            active1,
            event_id="evt_1RMTrialEnded00003",
            created=trial_end,
            previous=previous_trial,
        ),
        event("invoice.paid", conversion, event_id="evt_1RMConvPaid0000004", created=trial_end + timedelta(hours=1)),
        event(
            "customer.subscription.updated",
            active2,
            event_id="evt_1RUCycleAdvance005",
            created=month2,
            previous=previous_cycle,
        ),
        event("invoice.paid", renewal, event_id="evt_1RURenewalPaid0006", created=month2 + timedelta(hours=1)),
        event(
            "customer.subscription.updated",
            cancelling,
            event_id="evt_1RZCancelAtEnd0007",
            created=month2 + timedelta(days=5),
            previous={"cancel_at_period_end": False, "cancel_at": None, "canceled_at": None},
        ),
        event("customer.subscription.deleted", ended, event_id="evt_1SAEndedDeleted008", created=month3),
    ]


# --- hostile input -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
KINDS = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "invoice.paid",
    "invoice.payment_failed",
    "charge.refunded",
    "refund.created",
    "charge.refund.updated",
    "anything.else",
]
OBJECT_FIELDS = [
    "id",
    "status",
    "items",
    "metadata",
    "trial_end",
    "cancel_at",
    "cancel_at_period_end",
    "cancellation_details",
    "lines",
    "parent",
    "subscription",
    "amount_paid",
    "currency",
    "billing_reason",
    "attempt_count",
    "invoice",
    "amount_refunded",
    "customer",
    "refunds",
    "amount",
    "charge",
]


@st.composite
def hostile_events(draw: Any) -> bytes:
    choice = draw(st.integers(min_value=0, max_value=3))
    if choice == 0:
        return bytes(draw(st.binary(max_size=200)))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    basil = draw(st.booleans())
    refund = refund_object("re_1", 250, T0)
    obj = draw(st.sampled_from([subscription(basil=basil), invoice(basil=basil), charge(),
                                with_refunds(charge(), refund), dict(refund)]))
    for name in draw(st.lists(st.sampled_from(OBJECT_FIELDS), max_size=3)):
        obj[name] = draw(json_values)
    evt = event(draw(st.sampled_from(KINDS)), obj, api_version=draw(st.sampled_from([BASIL, ACACIA, "", "x"])))
    if draw(st.booleans()):
        evt["data"]["previous_attributes"] = draw(json_values)
    for name in draw(st.lists(st.sampled_from(["id", "type", "created", "data", "livemode", "object"]), max_size=2)):
        evt[name] = draw(json_values)
    return encode(evt)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_events(), st.sampled_from(["sign", "garbage", "none"]))
def test_hostile_bodies_only_raise_payload_rejected(raw: bytes, header_kind: str) -> None:
    header = {"sign": stripe_sign(raw, SECRET, ts(NOW)), "garbage": "t=,v1=,=", "none": None}[header_kind]
    try:
        n = parse_webhook(raw, header, CONFIG, NOW, subscription_for=lambda ref: SUB)
    except PayloadRejected:
        return
    assert isinstance(n, Notification)
    for e in n.events:
        assert e.subscription_key == n.subscription_key


if __name__ == "__main__":
    from pathlib import Path

    target = Path(__file__).resolve().parent.parent / "app" / "samples" / "stripe_lifecycle.ndjson"
    target.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in build_sample_lifecycle()))
    print(f"wrote {target}")
