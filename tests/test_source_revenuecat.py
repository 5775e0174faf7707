"""RevenueCat adapter: the Authorization check, each event type, TRANSFER links, hostile bodies."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, MalformedPayload, PayloadRejected
from subledger.core.events import Environment, EventType, PeriodType, Reason, Source, Store
from subledger.core.lifecycle import TransitionKind, fold
from subledger.core.sources import Notification
from subledger.core.sources.revenuecat import (
    RevenueCatConfig,
    TransferLinks,
    check_authorization,
    parse_unverified,
    parse_webhook,
    transfer_links,
)

AUTH = "Bearer rc-webhook-secret-7f3a"
CONFIG = RevenueCatConfig(app_id="com.example.fitness", authorization=AUTH)
T0 = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def rc_event(kind: str, **fields: Any) -> dict[str, Any]:
    """A RevenueCat webhook event, shaped like RevenueCat's sample events."""
    event: dict[str, Any] = {
        "aliases": ["$RCAnonymousID:8b7f3a", "user_rc_1"],
        "app_id": "app7f3a9c2b1d",
        "app_user_id": "user_rc_1",
        "commission_percentage": 0.15,
        "country_code": "DE",
        "currency": "EUR",
        "entitlement_id": None,
        "entitlement_ids": ["pro"],
        "environment": "PRODUCTION",
        "event_timestamp_ms": ms(T0 + timedelta(seconds=20)),
        "expiration_at_ms": ms(T0 + timedelta(days=7)),
        "id": f"{kind}-7E2D-4F1A-9C3B-000000000001",
        "is_family_share": False,
        "offer_code": None,
        "original_app_user_id": "$RCAnonymousID:8b7f3a",
        "original_transaction_id": "1000000900000001",
        "period_type": "NORMAL",
        "presented_offering_id": "default",
        "price": 10.75,
        "price_in_purchased_currency": 9.99,
        "product_id": "fitness_monthly",
        "purchased_at_ms": ms(T0),
        "store": "APP_STORE",
        "subscriber_attributes": {"$email": {"updated_at_ms": ms(T0), "value": "a@example.com"}},
        "takehome_percentage": 0.85,
        "tax_percentage": 0.16,
        "transaction_id": "1000000900000001",
        "type": kind,
    }
    event.update(fields)
    return event


def envelope(event: dict[str, Any]) -> bytes:
    return json.dumps({"api_version": "1.0", "event": event}).encode()


def parse(kind: str, **fields: Any) -> Notification:
    return parse_webhook(envelope(rc_event(kind, **fields)), AUTH, CONFIG)


# --- authorization -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", [None, "", "Bearer wrong", AUTH.lower(), AUTH + " ", "Bearer rc-webhook-secret-7f3", "é"]
)
def test_wrong_or_missing_authorization_is_rejected(header: str | None) -> None:
    with pytest.raises(BadSignature) as err:
        parse_webhook(envelope(rc_event("RENEWAL")), header, CONFIG)
    assert err.value.field == "Authorization"


def test_authorization_is_checked_before_the_body_is_read() -> None:
    with pytest.raises(BadSignature):
        parse_webhook(b"not json", "Bearer wrong", CONFIG)
    check_authorization(AUTH, CONFIG)


def test_config_requires_an_authorization_value() -> None:
    with pytest.raises(ConfigError):
        RevenueCatConfig(app_id="a", authorization="")
    with pytest.raises(ConfigError):
        RevenueCatConfig(app_id="", authorization="x")


# --- mapping -----------------------------------------------------------------------------------


def test_initial_purchase_trial_is_trial_purchase() -> None:
    n = parse("INITIAL_PURCHASE", period_type="TRIAL", price=0, price_in_purchased_currency=0)
    (e,) = n.events
    assert (e.type, e.period_type, e.price, e.currency) == (EventType.PURCHASE, PeriodType.TRIAL, Decimal(0), "EUR")
    assert (e.source, e.store, e.environment) == (Source.REVENUECAT, Store.APP_STORE, Environment.PRODUCTION)
    assert (e.subscription_id, e.app_user_id, e.product_id) == ("1000000900000001", "user_rc_1", "fitness_monthly")
    assert (e.occurred_at, e.expires_at, e.country_code) == (T0, T0 + timedelta(days=7), "DE")
    assert n.external_id == e.id == "INITIAL_PURCHASE-7E2D-4F1A-9C3B-000000000001"
    assert n.app_id == e.app_id == "com.example.fitness"


def test_initial_purchase_paid_uses_the_purchased_currency_price() -> None:
    (e,) = parse("INITIAL_PURCHASE").events
    assert (e.type, e.period_type, e.price, e.currency) == (
        EventType.PURCHASE,
        PeriodType.NORMAL,
        Decimal("9.99"),
        "EUR",
    )
    assert e.attributes["price_usd"] == "10.75"


def test_renewal_notes_trial_conversion() -> None:
    (e,) = parse("RENEWAL", is_trial_conversion=True, transaction_id="1000000900000002").events
    assert (e.type, e.transaction_id, e.attributes["is_trial_conversion"]) == (
        EventType.RENEWAL,
        "1000000900000002",
        True,
    )


def test_cancellation_is_auto_renew_disabled_with_reason() -> None:
    (e,) = parse("CANCELLATION", cancel_reason="UNSUBSCRIBE").events
    assert (e.type, e.reason, e.price) == (EventType.AUTO_RENEW_DISABLED, Reason.UNSUBSCRIBE, None)
    assert e.occurred_at == T0 + timedelta(seconds=20)


def test_billing_error_cancellation() -> None:
    (e,) = parse("CANCELLATION", cancel_reason="BILLING_ERROR").events
    assert (e.type, e.reason) == (EventType.AUTO_RENEW_DISABLED, Reason.BILLING_ERROR)


def test_customer_support_cancellation_with_negative_price_is_refund() -> None:
    (e,) = parse(
        "CANCELLATION", cancel_reason="CUSTOMER_SUPPORT", price=-10.75, price_in_purchased_currency=-9.99
    ).events
    assert (e.type, e.price, e.currency, e.reason) == (
        EventType.REFUND,
        Decimal("-9.99"),
        "EUR",
        Reason.CUSTOMER_SUPPORT,
    )
    assert e.occurred_at == T0 + timedelta(seconds=20)  # when refunded, not when bought


def test_customer_support_cancellation_without_refund_is_cancellation() -> None:
    (e,) = parse("CANCELLATION", cancel_reason="CUSTOMER_SUPPORT").events
    assert (e.type, e.reason) == (EventType.AUTO_RENEW_DISABLED, Reason.CUSTOMER_SUPPORT)


def test_refund_states_the_refunded_purchase_and_turns_nothing_off() -> None:
    (refund,) = parse("CANCELLATION", id="rc-refund", cancel_reason="CUSTOMER_SUPPORT", price=-10.75,
                      price_in_purchased_currency=-9.99, period_type="INTRO",
                      event_timestamp_ms=ms(T0 + timedelta(days=3))).events
    assert (refund.product_id, refund.purchased_at, refund.period_type) == ("fitness_monthly", T0, PeriodType.INTRO)
    (bought,) = parse("INITIAL_PURCHASE", id="rc-buy").events
    state = fold([bought, refund]).state
    assert (state.auto_renew, state.expired) == (True, False)  # RevenueCat: a refund may leave auto-renew on


def test_aliases_and_original_app_user_id_are_carried_once_each() -> None:
    (e,) = parse("INITIAL_PURCHASE", aliases=["$RCAnonymousID:8b7f3a", "user_rc_1", 7, "", "x" * 501],
                 original_app_user_id="$RCAnonymousID:0001").events
    assert e.aliases == ("$RCAnonymousID:8b7f3a", "user_rc_1", "$RCAnonymousID:0001")
    assert parse("INITIAL_PURCHASE", aliases=None, original_app_user_id=None).events[0].aliases == ()


@pytest.mark.parametrize(("stated", "carried"), [(0.85, Decimal("0.85")), (None, None), (1.5, None), ("x", None),
                                                 (True, None)])
def test_takehome_percentage_is_carried_on_charges_when_it_is_a_share(stated: Any, carried: Decimal | None) -> None:
    assert parse("RENEWAL", takehome_percentage=stated).events[0].takehome_percentage == carried
    assert parse("BILLING_ISSUE", takehome_percentage=stated).events[0].takehome_percentage is None


def test_renewal_states_is_trial_conversion_for_the_fold_without_prior_state() -> None:
    (e,) = parse("RENEWAL", is_trial_conversion=True).events
    assert e.is_trial_conversion is True
    assert [t.kind for t in fold([e]).transitions] == [TransitionKind.TRIAL_CONVERTED]
    assert parse("RENEWAL", is_trial_conversion="yes").events[0].is_trial_conversion is None


def test_uncancellation() -> None:
    assert parse("UNCANCELLATION").events[0].type is EventType.AUTO_RENEW_ENABLED


def test_non_renewing_purchase_is_one_time_purchase() -> None:
    (e,) = parse("NON_RENEWING_PURCHASE", product_id="fitness_lifetime", expiration_at_ms=None).events
    assert (e.type, e.subscription_id, e.price, e.product_id) == (
        EventType.ONE_TIME_PURCHASE,
        None,
        Decimal("9.99"),
        "fitness_lifetime",
    )


def test_subscription_paused_is_pause_scheduled() -> None:
    (e,) = parse("SUBSCRIPTION_PAUSED", store="PLAY_STORE", auto_resume_at_ms=ms(T0 + timedelta(days=30))).events
    assert (e.type, e.store) == (EventType.PAUSE_SCHEDULED, Store.PLAY_STORE)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("UNSUBSCRIBE", Reason.UNSUBSCRIBE),
        ("BILLING_ERROR", Reason.BILLING_ERROR),
        ("SUBSCRIPTION_PAUSED", Reason.SUBSCRIPTION_PAUSED),
        ("SOMETHING_NEW", Reason.UNKNOWN),
        (None, Reason.UNKNOWN),
    ],
)
def test_expiration_reason(raw: str | None, reason: Reason) -> None:
    (e,) = parse("EXPIRATION", expiration_reason=raw).events
    assert (e.type, e.reason) == (EventType.EXPIRATION, reason)


def test_billing_issue() -> None:
    (e,) = parse("BILLING_ISSUE", grace_period_expiration_at_ms=ms(T0 + timedelta(days=16))).events
    assert e.type is EventType.BILLING_ISSUE


def test_product_change() -> None:
    (e,) = parse("PRODUCT_CHANGE", new_product_id="fitness_yearly").events
    assert (e.type, e.product_id, e.new_product_id) == (EventType.PRODUCT_CHANGE, "fitness_monthly", "fitness_yearly")


def test_product_change_without_new_product_is_invalid() -> None:
    with pytest.raises(InvalidEvent):
        parse("PRODUCT_CHANGE", new_product_id=None)


def test_extension_and_refund_reversal_are_stated() -> None:
    assert parse("SUBSCRIPTION_EXTENDED").events[0].type is EventType.EXTENDED
    assert parse("REFUND_REVERSED").events[0].type is EventType.REFUND_REVERSED


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("PLAY_STORE", Store.PLAY_STORE),
        ("STRIPE", Store.STRIPE),
        ("AMAZON", Store.AMAZON),
        ("MAC_APP_STORE", Store.APP_STORE),
        ("RC_BILLING", Store.OTHER),
        ("ROKU", Store.OTHER),
    ],
)
def test_store_mapping(store: str, expected: Store) -> None:
    assert parse("RENEWAL", store=store).events[0].store is expected


def test_sandbox_environment() -> None:
    assert parse("RENEWAL", environment="SANDBOX").events[0].environment is Environment.SANDBOX


def test_promotional_grant_without_transaction_ids_gets_a_named_stream() -> None:
    (e,) = parse(
        "INITIAL_PURCHASE",
        store="PROMOTIONAL",
        period_type="PROMOTIONAL",
        original_transaction_id=None,
        transaction_id=None,
        price=0,
        price_in_purchased_currency=None,
    ).events
    assert e.subscription_id == "promotional:user_rc_1:fitness_monthly"
    assert e.period_type is PeriodType.PROMOTIONAL


def test_app_ids_map_revenuecat_apps() -> None:
    cfg = RevenueCatConfig(app_id="default", authorization=AUTH, app_ids={"app7f3a9c2b1d": "com.example.fitness.ios"})
    n = parse_webhook(envelope(rc_event("RENEWAL")), AUTH, cfg)
    assert n.app_id == n.events[0].app_id == "com.example.fitness.ios"


def test_malformed_country_is_dropped_not_refused() -> None:
    assert parse("RENEWAL", country_code="Germany").events[0].country_code is None


@pytest.mark.parametrize(
    "kind", ["TEST", "TEMPORARY_ENTITLEMENT_GRANT", "INVOICE_ISSUANCE", "EXPERIMENT_ENROLLMENT", "NEW_TYPE"]
)
def test_other_types_are_stored_only(kind: str) -> None:
    n = parse(kind)
    assert (n.events, n.kind, n.subscription_key) == ((), kind, None)


def test_transfer_is_stored_only_and_exposes_links() -> None:
    transfer = rc_event(
        "TRANSFER",
        app_user_id=None,
        transferred_from=["$RCAnonymousID:old"],
        transferred_to=["user_rc_2", 5],
    )
    raw = envelope(transfer)
    n = parse_webhook(raw, AUTH, CONFIG)
    assert n.events == ()
    assert transfer_links(raw) == TransferLinks(
        event_id=transfer["id"],
        transferred_from=("$RCAnonymousID:old",),
        transferred_to=("user_rc_2",),
        occurred_at=T0 + timedelta(seconds=20),
    )
    assert transfer_links(envelope(rc_event("RENEWAL"))) is None


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"nope", MalformedPayload),
        (b"[]", MalformedPayload),
        (b'{"api_version": "1.0"}', MalformedPayload),
        (b'{"api_version": 1, "event": {}}', MalformedPayload),
        (b'{"event": {"type": "RENEWAL"}}', InvalidEvent),
        (b'{"event": {"id": "x"}}', InvalidEvent),
    ],
)
def test_malformed_bodies_are_rejected(raw: bytes, error: type[PayloadRejected]) -> None:
    with pytest.raises(error):
        parse_unverified(raw, CONFIG)


def test_missing_subscription_id_is_invalid() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse("RENEWAL", original_transaction_id=None, transaction_id=None)
    assert err.value.field == "event.original_transaction_id"


def test_folded_revenuecat_lifecycle() -> None:
    steps = [
        rc_event("INITIAL_PURCHASE", id="e1", period_type="TRIAL", price=0, price_in_purchased_currency=0),
        rc_event(
            "RENEWAL",
            id="e2",
            is_trial_conversion=True,
            transaction_id="t2",
            purchased_at_ms=ms(T0 + timedelta(days=7)),
            event_timestamp_ms=ms(T0 + timedelta(days=7, seconds=9)),
        ),
        rc_event("CANCELLATION", id="e3", cancel_reason="UNSUBSCRIBE", event_timestamp_ms=ms(T0 + timedelta(days=9))),
        rc_event("UNCANCELLATION", id="e4", event_timestamp_ms=ms(T0 + timedelta(days=10))),
        rc_event(
            "EXPIRATION", id="e5", expiration_reason="BILLING_ERROR", event_timestamp_ms=ms(T0 + timedelta(days=40))
        ),
    ]
    events = [e for step in steps for e in parse_webhook(envelope(step), AUTH, CONFIG).events]
    assert [t.kind for t in fold(events).transitions] == [
        TransitionKind.TRIAL_STARTED,
        TransitionKind.TRIAL_CONVERTED,
        TransitionKind.CANCELLATION,
        TransitionKind.UNCANCELLATION,
        TransitionKind.EXPIRATION,
    ]


# --- hostile input -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
TYPES = [
    "INITIAL_PURCHASE",
    "RENEWAL",
    "CANCELLATION",
    "UNCANCELLATION",
    "NON_RENEWING_PURCHASE",
    "SUBSCRIPTION_PAUSED",
    "EXPIRATION",
    "BILLING_ISSUE",
    "PRODUCT_CHANGE",
    "TRANSFER",
    "SUBSCRIPTION_EXTENDED",
    "X",
]
FIELDS = sorted(set(rc_event("RENEWAL")) | {"new_product_id", "cancel_reason", "expiration_reason", "transferred_to"})


@st.composite
def hostile_bodies(draw: Any) -> bytes:
    choice = draw(st.integers(min_value=0, max_value=3))
    if choice == 0:
        return bytes(draw(st.binary(max_size=200)))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    event = rc_event(draw(st.sampled_from(TYPES)))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        event[name] = draw(json_values)
    return envelope(event)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_bodies(), st.sampled_from([AUTH, "wrong", None]))
def test_hostile_bodies_only_raise_payload_rejected(raw: bytes, header: str | None) -> None:
    try:
        n = parse_webhook(raw, header, CONFIG)
        links = transfer_links(raw)
    except PayloadRejected:
        return
    assert isinstance(n, Notification)
    assert links is None or isinstance(links, TransferLinks)
    for e in n.events:
        assert e.subscription_key == n.subscription_key
