"""Segment rendering (segment.md): a transition and a destination's settings → the exact wire messages."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subledger.core.events import CanonicalEvent, EventType, PeriodType, Reason, parse_event
from subledger.core.lifecycle import REVENUE_KINDS, Transition, TransitionKind, fold
from subledger.core.render import (
    DEFAULT_EVENT_NAMES,
    Commission,
    Destination,
    MissingRate,
    RevenueMode,
    iso_millis,
    render,
    takehome_share,
)

T0 = datetime(2024, 1, 1, 9, 30, 15, 123456, tzinfo=UTC)
MESSAGE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
K = TransitionKind


def ev(n: int, type_: str, days: float, **fields: Any) -> CanonicalEvent:
    body: dict[str, Any] = {
        "id": f"e{n}",
        "app_id": "com.example.app",
        "type": type_,
        "occurred_at": (T0 + timedelta(days=days)).isoformat(),
        "subscription_id": "1000000123",
        "store": "app_store",
        "app_user_id": "user-1",
    }
    if type_ in ("purchase", "renewal", "one_time_purchase"):
        body.update(product_id="pro_monthly", price="9.99", currency="USD", transaction_id=f"t{n}",
                    expires_at=(T0 + timedelta(days=days + 30)).isoformat())
    body.update(fields)
    return parse_event({k: v for k, v in body.items() if v is not None})


def transitions(*events: CanonicalEvent) -> tuple[Transition, ...]:
    return fold(list(events)).transitions


def initial(**fields: Any) -> Transition:
    (transition,) = transitions(ev(1, "purchase", 0, **fields))
    assert transition.kind is K.INITIAL_PURCHASE
    return transition


def track(transition: Transition, dest: Destination | None = None, **kw: Any) -> dict[str, Any]:
    message, _ = render(transition, dest or Destination(name="segment", app_id="com.example.app"), **kw)
    assert message["type"] == "track"
    return message


def revenue(transition: Transition, dest: Destination) -> float:
    value = track(transition, dest)["properties"]["revenue"]
    assert isinstance(value, float)
    return value


DEST = Destination(name="segment", app_id="com.example.app", library_version="0.1.0")


# -- identity of messages --------------------------------------------------------------------------


def test_track_and_identify_shape() -> None:
    t = initial(country_code="US")
    message, identify = render(t, DEST, aliases=("$RCAnonymousID:abc", "user-1"))
    assert message == {
        "type": "track",
        "messageId": message["messageId"],
        "userId": "user-1",
        "event": "rc_initial_purchase_event",
        "timestamp": "2024-01-01T09:30:15.123Z",
        "properties": {
            "revenue": 9.99,
            "currency": "USD",
            "takehome_percentage": 0.7,  # the store's cut is stated even when revenue is gross
            "commission_source": "estimate",  # issue 14: which take-home was used is said
            "price": 9.99,
            "price_in_purchased_currency": 9.99,
            "purchased_currency": "USD",
            "product_id": "pro_monthly",
            "period_type": "NORMAL",
            "store": "APP_STORE",
            "environment": "PRODUCTION",
            "transaction_id": "t1",
            "original_transaction_id": "1000000123",
            "app_id": "com.example.app",
            "app_user_id": "user-1",
            "purchased_at": int(T0.timestamp()),
            "expires_at": int((T0 + timedelta(days=30)).timestamp()),
            "country_code": "US",
            "event_id": "e1",
        },
        "context": {"environment": "production", "library": {"name": "subledger", "version": "0.1.0"}},
    }
    assert identify == {
        "type": "identify",
        "messageId": identify["messageId"],
        "userId": "user-1",
        "traits": {
            "subscription_status": "active",
            "last_seen_app_user_id": "user-1",
            "aliases": ["$RCAnonymousID:abc", "user-1"],
        },
        "timestamp": "2024-01-01T09:30:15.123Z",
        "context": message["context"],
    }


def test_message_ids_are_short_safe_deterministic_and_distinct_per_destination() -> None:
    t = initial()
    other = replace(DEST, name="rudderstack")
    a_track, a_identify = render(t, DEST)
    again_track, again_identify = render(t, replace(DEST, revenue_mode=RevenueMode.AFTER_COMMISSION))
    b_track, b_identify = render(t, other)
    ids = [a_track["messageId"], a_identify["messageId"], b_track["messageId"], b_identify["messageId"]]
    assert len(set(ids)) == 4
    for message_id in ids:
        assert len(message_id) <= 64
        assert MESSAGE_ID.match(message_id)
    # the id depends only on (transition, destination): settings, retries and rebuilds keep it
    assert (again_track["messageId"], again_identify["messageId"]) == (a_track["messageId"], a_identify["messageId"])
    assert render(t, DEST) == render(t, DEST)
    (refolded,) = transitions(ev(1, "purchase", 0))
    assert render(refolded, DEST) == render(t, DEST)


def test_message_ids_differ_between_transitions() -> None:
    ids = {
        message["messageId"]
        for t in transitions(ev(1, "purchase", 0), ev(2, "renewal", 30), ev(3, "auto_renew_disabled", 40))
        for message in render(t, DEST)
    }
    assert len(ids) == 6


def test_anonymous_id_when_no_app_user_is_known() -> None:
    t = initial(app_user_id=None)
    for message in render(t, DEST):
        assert "userId" not in message
        assert message["anonymousId"] == "anon:com.example.app/app_store/1000000123"
    assert "app_user_id" not in track(t)["properties"]
    assert "last_seen_app_user_id" not in render(t, DEST)[1]["traits"]


def test_user_id_when_known() -> None:
    for message in render(initial(), DEST):
        assert message["userId"] == "user-1"
        assert "anonymousId" not in message


# -- names, sandbox, history -----------------------------------------------------------------------


def test_default_names_are_revenuecats() -> None:
    assert DEFAULT_EVENT_NAMES[K.TRIAL_STARTED] == "rc_trial_started_event"
    assert DEFAULT_EVENT_NAMES[K.NON_SUBSCRIPTION_PURCHASE] == "rc_non_subscription_purchase_event"
    assert DEFAULT_EVENT_NAMES[K.SUBSCRIPTION_PAUSED] == "rc_subscription_paused_event"
    assert len(DEFAULT_EVENT_NAMES) == len(TransitionKind) == 12


def test_event_name_map_and_empty_name_disables() -> None:
    t = initial()
    dest = replace(DEST, event_names={K.INITIAL_PURCHASE: "Subscription Started", K.RENEWAL: ""})
    assert track(t, dest)["event"] == "Subscription Started"
    assert dest.accepts(t, historical=False)
    (_, renewal) = transitions(ev(1, "purchase", 0), ev(2, "renewal", 30))
    assert renewal.kind is K.RENEWAL
    assert not dest.accepts(renewal, historical=False)
    cancellation = transitions(ev(1, "purchase", 0), ev(2, "auto_renew_disabled", 3))[-1]
    assert track(cancellation, dest)["event"] == "rc_cancellation_event"  # unmapped kinds keep the default
    string_keys = replace(DEST, event_names={"initial_purchase": "Started"})  # as a TOML table gives them
    assert track(t, string_keys)["event"] == "Started"


def test_sandbox_routing() -> None:
    t = initial(environment="sandbox")
    assert not DEST.accepts(t, historical=False)
    sandbox_ok = replace(DEST, send_sandbox=True)
    assert sandbox_ok.accepts(t, historical=False)
    message = track(t, sandbox_ok)
    assert message["context"]["environment"] == "sandbox"
    assert message["properties"]["environment"] == "SANDBOX"
    assert DEST.accepts(initial(), historical=False)


def test_historical_is_not_published_unless_opted_in() -> None:
    t = initial()
    assert not DEST.accepts(t, historical=True)
    assert replace(DEST, publish_historical=True).accepts(t, historical=True)
    assert not replace(DEST, publish_historical=True, send_sandbox=False).accepts(
        initial(environment="sandbox"), historical=True
    )


# -- revenue ---------------------------------------------------------------------------------------


def test_gross_revenue() -> None:
    assert revenue(initial(), DEST) == 9.99


def test_app_store_commission_30_first_year_15_after() -> None:
    dest = replace(DEST, revenue_mode=RevenueMode.AFTER_COMMISSION)
    purchase, first_renewal, later = transitions(
        ev(1, "purchase", 0), ev(2, "renewal", 30), ev(3, "renewal", 365)
    )
    assert revenue(purchase, dest) == 6.993
    assert revenue(first_renewal, dest) == 6.993
    assert revenue(later, dest) == 8.4915
    assert track(later, dest)["properties"]["takehome_percentage"] == 0.85
    small = replace(dest, commission=Commission(app_store_small_business=True))
    assert revenue(purchase, small) == 8.4915


def test_first_paid_year_starts_at_the_trial_conversion() -> None:
    dest = replace(DEST, revenue_mode=RevenueMode.AFTER_COMMISSION)
    _, converted, renewal = transitions(
        ev(1, "purchase", 0, period_type="trial", price="0", expires_at=(T0 + timedelta(days=7)).isoformat()),
        ev(2, "renewal", 7),
        ev(3, "renewal", 7 + 360),
    )
    assert converted.kind is K.TRIAL_CONVERTED
    assert revenue(converted, dest) == 6.993
    assert revenue(renewal, dest) == 6.993  # 360 days after the first charge: still the first year


def test_play_and_stripe_commission() -> None:
    dest = replace(DEST, revenue_mode=RevenueMode.AFTER_COMMISSION)
    play = initial(store="play_store")
    assert revenue(play, dest) == 8.4915
    stripe = initial(store="stripe")
    assert revenue(stripe, dest) == 9.99
    assert revenue(stripe, replace(dest, commission=Commission(stripe=Decimal("0.029")))) == 9.7003


def test_after_commission_and_tax() -> None:
    dest = replace(
        DEST,
        revenue_mode=RevenueMode.AFTER_COMMISSION_AND_TAX,
        tax_rates={"DE": Decimal("0.19")},
        default_tax_rate=Decimal("0.10"),
    )
    german = initial(price="11.90", country_code="DE", store="play_store")
    assert revenue(german, dest) == pytest.approx(11.90 / 1.19 * 0.85, abs=1e-4)
    assert revenue(german, dest) == 8.5
    elsewhere = initial(price="11", country_code="JP")
    assert revenue(elsewhere, dest) == pytest.approx(11 / 1.10 * 0.70, abs=1e-4)
    assert takehome_share(elsewhere, dest) == Decimal("0.70") / Decimal("1.10")
    assert takehome_share(elsewhere, DEST) == 1
    assert track(elsewhere, dest)["properties"]["takehome_percentage"] == 0.6364
    assert track(elsewhere, DEST)["properties"]["takehome_percentage"] == 0.7  # no tax table: commission only


def test_currency_conversion_with_rates_and_missing_rate() -> None:
    dest = replace(DEST, currency="USD", rates={"EUR": Decimal("1.10")})
    euro = initial(currency="EUR", price="10")
    props = track(euro, dest)["properties"]
    assert props["revenue"] == 11.0
    assert props["currency"] == "USD"
    assert props["price"] == 11.0
    assert props["price_in_purchased_currency"] == 10.0
    assert props["purchased_currency"] == "EUR"
    assert track(initial(), dest)["properties"]["revenue"] == 9.99  # already in the target currency
    with pytest.raises(MissingRate):
        render(initial(currency="GBP"), dest)
    net = replace(dest, revenue_mode=RevenueMode.AFTER_COMMISSION)
    assert track(euro, net)["properties"]["revenue"] == 7.7


def test_refund_has_negative_revenue() -> None:
    refund = transitions(ev(1, "purchase", 0), ev(2, "refund", 3, transaction_id="t1"))[-1]
    assert refund.kind is K.CANCELLATION and refund.cancel_reason is Reason.CUSTOMER_SUPPORT
    props = track(refund, DEST)["properties"]
    assert props["revenue"] == -9.99
    assert props["currency"] == "USD"
    assert props["cancel_reason"] == "CUSTOMER_SUPPORT"
    net = replace(DEST, revenue_mode=RevenueMode.AFTER_COMMISSION)
    assert revenue(refund, net) == -6.993


def test_revenue_only_on_revenue_kinds_and_refunds() -> None:
    history = [
        ev(1, "purchase", 0, period_type="trial", price="0", expires_at=(T0 + timedelta(days=7)).isoformat()),
        ev(2, "renewal", 7),
        ev(3, "billing_issue", 37),
        ev(4, "billing_recovered", 38, price="9.99", currency="USD", transaction_id="t4"),
        ev(5, "product_change", 40, new_product_id="pro_yearly"),
        ev(6, "auto_renew_disabled", 41),
        ev(7, "auto_renew_enabled", 42),
        ev(8, "pause_scheduled", 43),
        ev(9, "expiration", 70),
    ]
    for t in transitions(*history):
        props = track(t, DEST)["properties"]
        assert ("revenue" in props) == (t.kind in REVENUE_KINDS), t.kind


def test_properties_per_kind() -> None:
    trial, converted = transitions(
        ev(1, "purchase", 0, period_type="trial", price="0", expires_at=(T0 + timedelta(days=7)).isoformat()),
        ev(2, "renewal", 7),
    )
    assert track(trial)["properties"]["period_type"] == "TRIAL"
    assert "revenue" not in track(trial)["properties"]
    props = track(converted)["properties"]
    assert props["is_trial_conversion"] is True and props["renewal_number"] == 1
    change = transitions(ev(1, "purchase", 0), ev(2, "product_change", 3, new_product_id="pro_yearly"))[-1]
    assert track(change)["properties"]["new_product_id"] == "pro_yearly"
    assert track(change)["properties"]["product_id"] == "pro_monthly"
    expiry = transitions(ev(1, "purchase", 0), ev(2, "expiration", 30, reason="billing_error"))[-1]
    assert track(expiry)["properties"]["expiration_reason"] == "BILLING_ERROR"
    assert render(expiry, DEST)[1]["traits"]["subscription_status"] == "expired"


def test_one_time_purchase_sends_no_subscription_status() -> None:
    (otp,) = transitions(ev(1, "one_time_purchase", 0, subscription_id=None))
    message, identify = render(otp, DEST)
    assert message["event"] == "rc_non_subscription_purchase_event"
    assert message["properties"]["revenue"] == 9.99
    assert "subscription_status" not in identify["traits"]


def test_timestamp_is_utc_with_milliseconds() -> None:
    assert iso_millis(datetime(2024, 5, 6, 7, 8, 9, 999999, tzinfo=UTC)) == "2024-05-06T07:08:09.999Z"
    assert iso_millis(datetime(2024, 5, 6, 9, 8, 9, tzinfo=timezone(timedelta(hours=2)))) == "2024-05-06T07:08:09.000Z"
    t = initial()
    shifted = replace(t, occurred_at=t.occurred_at.astimezone(timezone(timedelta(hours=-5))))
    for message in render(shifted, DEST):
        assert message["timestamp"] == "2024-01-01T09:30:15.123Z"
        assert TIMESTAMP.match(message["timestamp"])


# -- no nulls, ever --------------------------------------------------------------------------------


def _assert_no_none(value: Any, path: str = "$") -> None:
    assert value is not None, path
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_no_none(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_no_none(item, f"{path}[{i}]")


DESTINATIONS = [
    DEST,
    replace(DEST, name="net", revenue_mode=RevenueMode.AFTER_COMMISSION, send_sandbox=True),
    replace(DEST, name="net-tax", revenue_mode=RevenueMode.AFTER_COMMISSION_AND_TAX,
            tax_rates={"DE": Decimal("0.19")}, currency="USD", rates={"EUR": Decimal("1.08")}),
]

_KINDS = st.sampled_from([t for t in EventType if t is not EventType.ONE_TIME_PURCHASE])


@st.composite
def lifecycles(draw: st.DrawFn) -> tuple[Transition, ...]:
    """A purchase then random facts with optional fields present or absent."""
    events = [ev(0, "purchase", 0, period_type=draw(st.sampled_from([p.value for p in PeriodType])),
                 app_user_id=draw(st.sampled_from([None, "user-1"])), currency=draw(st.sampled_from(["USD", "EUR"])),
                 country_code=draw(st.sampled_from([None, "DE", "US"])))]
    for n, kind in enumerate(draw(st.lists(_KINDS, max_size=8)), start=1):
        fields: dict[str, Any] = {"app_user_id": draw(st.sampled_from([None, "user-1", "user-2"]))}
        if kind in (EventType.RENEWAL, EventType.BILLING_RECOVERED, EventType.REFUND):
            fields.update(price=draw(st.sampled_from([None, "0", "4.99"])), currency="EUR")
            if fields["price"] is None:
                del fields["currency"]
        if kind is EventType.PRODUCT_CHANGE:
            fields["new_product_id"] = "pro_yearly"
        if kind is EventType.RENEWAL:
            fields["product_id"] = "pro_monthly"
        events.append(ev(n, kind.value, n * 20, **fields))
    if draw(st.booleans()):
        events.append(ev(99, "one_time_purchase", 1, subscription_id=None))
    return transitions(*events)


@settings(max_examples=100, deadline=None)
@given(lifecycles())
def test_rendered_messages_never_hold_none_and_keep_the_contract(history: tuple[Transition, ...]) -> None:
    for t in history:
        for dest in DESTINATIONS:
            messages = render(t, dest)
            _assert_no_none(messages)
            assert json.loads(json.dumps(messages)) == messages
            for message in messages:
                assert len(message["messageId"]) <= 64 and MESSAGE_ID.match(message["messageId"])
                assert TIMESTAMP.match(message["timestamp"])
                assert ("userId" in message) != ("anonymousId" in message)
            props = messages[0]["properties"]
            if "revenue" in props:
                assert props["revenue"] < 0 or t.kind in REVENUE_KINDS
                assert props["revenue"] <= 0 or t.kind is not K.CANCELLATION
                assert props["currency"] == (dest.currency or t.currency)


def test_no_none_on_a_bare_transition() -> None:
    bare = Transition(
        id="tr_x",
        kind=K.EXPIRATION,
        subscription_key="a/other/s",
        app_id="a",
        store=initial().store,
        environment=initial().environment,
        event_source="scheduler",
        event_id="x",
        occurred_at=T0,
        status=None,
    )
    messages = render(bare, DEST)
    _assert_no_none(messages)
    assert messages[1]["traits"] == {}
    assert messages[0]["properties"] == {
        "store": "APP_STORE", "environment": "PRODUCTION", "app_id": "a", "event_id": "x",
    }
