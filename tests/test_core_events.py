"""The canonical event contract (lifecycle.md): what `parse_event` accepts, rejects and keeps.

Every rejection names the field, so an API caller or an `ingest` error line can say what to fix.
Also here: the log's facts round-trip through `event_from_facts`, and the hash chain is stable.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subledger.core.chain import GENESIS, canonical_bytes, chain_hash, entry_for_hash
from subledger.core.errors import InvalidEvent, PayloadRejected
from subledger.core.events import (
    MAX_ID_LENGTH,
    Environment,
    EventType,
    PeriodType,
    Reason,
    Source,
    Store,
    event_from_facts,
    format_time,
    parse_event,
)

_DROP = object()  # a field to leave out


def valid(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "evt-1",
        "app_id": "com.example.app",
        "type": "purchase",
        "occurred_at": "2024-03-01T10:00:00Z",
        "subscription_id": "1000000123",
        "product_id": "pro_monthly",
        "price": "9.99",
        "currency": "USD",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not _DROP}


def test_a_full_event_parses_into_typed_fields() -> None:
    event = parse_event(
        valid(
            source="apple",
            app_user_id="user-7",
            environment="sandbox",
            period_type="intro",
            expires_at="2024-04-01T10:00:00+02:00",
            transaction_id="2000000456",
            country_code="de",
            currency="eur",
            price=4.5,
            reason="unsubscribe",
            attributes={"offer": {"code": "SPRING"}},
        )
    )
    assert event.source is Source.APPLE
    assert event.store is Store.APP_STORE  # default store follows the source
    assert event.type is EventType.PURCHASE
    assert event.environment is Environment.SANDBOX
    assert event.period_type is PeriodType.INTRO
    assert event.price == Decimal("4.5")
    assert event.currency == "EUR"
    assert event.country_code == "DE"
    assert event.reason is Reason.UNSUBSCRIBE
    assert event.occurred_at == datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert event.expires_at == datetime(2024, 4, 1, 8, tzinfo=UTC)  # normalised to UTC
    assert event.attributes == {"offer": {"code": "SPRING"}}
    assert event.subscription_key == "com.example.app/app_store/1000000123"


def test_defaults() -> None:
    event = parse_event(valid())
    assert event.source is Source.CUSTOM
    assert event.store is Store.OTHER
    assert event.environment is Environment.PRODUCTION
    assert event.period_type is PeriodType.NORMAL
    assert event.app_user_id is None and event.reason is None and event.attributes == {}
    assert parse_event(valid(), default_source=Source.STRIPE).store is Store.STRIPE
    assert parse_event(valid(source="google")).store is Store.PLAY_STORE
    assert parse_event(valid(source="google", store="amazon")).store is Store.AMAZON


def test_unknown_fields_are_accepted() -> None:
    event = parse_event(valid(offer_code="X", nested={"a": [1, 2]}, signedDate=1700000000))
    assert event.id == "evt-1"
    assert "offer_code" not in event.to_facts()  # kept in the raw payload by the log, not in the facts


def test_one_time_purchase_needs_no_subscription_and_gets_a_stream_of_its_own() -> None:
    a = parse_event(valid(type="one_time_purchase", subscription_id=_DROP, transaction_id="t-1"))
    b = parse_event(valid(id="evt-2", type="one_time_purchase", subscription_id=_DROP))
    assert a.subscription_id is None
    assert a.subscription_key == "com.example.app/other/otp:t-1"
    assert b.subscription_key == "com.example.app/other/otp:custom:evt-2"


def test_a_refund_may_carry_a_signed_amount() -> None:
    assert parse_event(valid(type="refund", price="-9.99")).price == Decimal("-9.99")
    assert parse_event(valid(type="refund", price="9.99")).price == Decimal("9.99")


def test_price_zero_needs_no_currency_and_numbers_are_accepted() -> None:
    assert parse_event(valid(price=0, currency=_DROP)).price == 0
    assert parse_event(valid(price=12)).price == Decimal("12")
    assert parse_event(valid(price="1.005")).price == Decimal("1.005")


def test_times_with_offsets_and_lowercase_z() -> None:
    assert parse_event(valid(occurred_at="2024-03-01T12:00:00.250+02:00")).occurred_at == datetime(
        2024, 3, 1, 10, 0, 0, 250000, tzinfo=UTC
    )
    assert parse_event(valid(occurred_at="2024-03-01T10:00:00z")).occurred_at == datetime(
        2024, 3, 1, 10, tzinfo=UTC
    )


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("missing id", valid(id=_DROP), "id"),
    ("null id", valid(id=None), "id"),
    ("empty id", valid(id="  "), "id"),
    ("id not a string", valid(id=123), "id"),
    ("id over 200 chars", valid(id="x" * (MAX_ID_LENGTH + 1)), "id"),
    ("missing app_id", valid(app_id=_DROP), "app_id"),
    ("app_id not a string", valid(app_id=["a"]), "app_id"),
    ("empty app_id", valid(app_id=""), "app_id"),
    ("missing type", valid(type=_DROP), "type"),
    ("unknown type", valid(type="subscribed"), "type"),
    ("type not a string", valid(type=1), "type"),
    ("missing occurred_at", valid(occurred_at=_DROP), "occurred_at"),
    ("null occurred_at", valid(occurred_at=None), "occurred_at"),
    ("epoch occurred_at", valid(occurred_at=1709287200), "occurred_at"),
    ("unparseable occurred_at", valid(occurred_at="yesterday"), "occurred_at"),
    ("occurred_at without offset", valid(occurred_at="2024-03-01T10:00:00"), "occurred_at"),
    ("date only occurred_at", valid(occurred_at="2024-03-01"), "occurred_at"),
    ("bad expires_at", valid(expires_at="2024-13-01T00:00:00Z"), "expires_at"),
    ("expires_at without offset", valid(expires_at="2024-04-01T00:00:00"), "expires_at"),
    ("missing subscription_id", valid(subscription_id=_DROP), "subscription_id"),
    ("empty subscription_id", valid(subscription_id=""), "subscription_id"),
    ("subscription_id not a string", valid(subscription_id=1000000123), "subscription_id"),
    ("missing product_id on purchase", valid(product_id=_DROP), "product_id"),
    ("missing product_id on renewal", valid(type="renewal", product_id=_DROP), "product_id"),
    ("missing new_product_id", valid(type="product_change"), "new_product_id"),
    ("unknown source", valid(source="paddle"), "source"),
    ("unknown store", valid(store="mac_app_store"), "store"),
    ("unknown environment", valid(environment="staging"), "environment"),
    ("unknown period_type", valid(period_type="free"), "period_type"),
    ("unknown reason", valid(reason="bored"), "reason"),
    ("price not a number", valid(price="nine"), "price"),
    ("price a boolean", valid(price=True), "price"),
    ("price an object", valid(price={"amount": 1}), "price"),
    ("price not finite", valid(price="NaN"), "price"),
    ("price infinite", valid(price="Infinity"), "price"),
    ("price absurd", valid(price="1e15"), "price"),
    ("price without currency", valid(currency=_DROP), "currency"),
    ("negative price on a purchase", valid(price="-9.99"), "price"),
    ("negative price on a renewal", valid(type="renewal", price=-1), "price"),
    ("currency not ISO 4217", valid(currency="U$D"), "currency"),
    ("currency too long", valid(currency="USDT"), "currency"),
    ("currency too short", valid(currency="US"), "currency"),
    ("currency not a string", valid(currency=840), "currency"),
    ("country not alpha-2", valid(country_code="D1"), "country_code"),
    ("country alpha-3", valid(country_code="DEU"), "country_code"),
    ("app_user_id not a string", valid(app_user_id=7), "app_user_id"),
    ("transaction_id not a string", valid(transaction_id=7), "transaction_id"),
    ("attributes not an object", valid(attributes=["a"]), "attributes"),
]


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in BAD_INPUTS], ids=[n for n, _, _ in BAD_INPUTS])
def test_bad_input_is_rejected_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(body)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert isinstance(caught.value, PayloadRejected)


@pytest.mark.parametrize("body", [None, [], "purchase", 42, [valid()]], ids=["null", "list", "str", "int", "array"])
def test_a_non_object_is_rejected(body: Any) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(body)
    assert caught.value.field is None
    assert "JSON object" in str(caught.value)


def test_id_of_exactly_200_chars_is_fine() -> None:
    assert len(parse_event(valid(id="x" * MAX_ID_LENGTH)).id) == MAX_ID_LENGTH


def test_format_time_is_fixed_width_utc_micros() -> None:
    assert format_time(datetime(2024, 3, 1, 10, tzinfo=UTC)) == "2024-03-01T10:00:00.000000Z"
    assert format_time(datetime(999, 1, 2, tzinfo=UTC)) == "0999-01-02T00:00:00.000000Z"


# -- the log's facts: what is stored and hashed rebuilds the same event -------------------------------

_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-:", min_size=1, max_size=40)


@st.composite
def canonical_bodies(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(list(EventType)))
    body: dict[str, Any] = {
        "id": draw(_word),
        "source": draw(st.sampled_from([s.value for s in Source])),
        "app_id": draw(_word),
        "type": kind.value,
        "occurred_at": format_time(draw(_times)),
        "subscription_id": draw(_word),
        "environment": draw(st.sampled_from(["production", "sandbox"])),
        "period_type": draw(st.sampled_from([p.value for p in PeriodType])),
    }
    if kind is EventType.ONE_TIME_PURCHASE and draw(st.booleans()):
        del body["subscription_id"]
    if kind in (EventType.PURCHASE, EventType.RENEWAL, EventType.ONE_TIME_PURCHASE) or draw(st.booleans()):
        body["product_id"] = draw(_word)
    if kind is EventType.PRODUCT_CHANGE:
        body["new_product_id"] = draw(_word)
    if draw(st.booleans()):
        refund = kind in (EventType.REFUND, EventType.REFUND_REVERSED)
        body["price"] = str(draw(st.decimals(min_value=-1000 if refund else 0, max_value=1000, places=2)))
        body["currency"] = draw(st.sampled_from(["USD", "EUR", "JPY"]))
    optional = {
        "app_user_id": _word,
        "expires_at": _times.map(format_time),
        "transaction_id": _word,
        "country_code": st.sampled_from(["US", "DE", "JP"]),
        "reason": st.sampled_from([r.value for r in Reason]),
        "attributes": st.dictionaries(_word, st.integers(-(2**63), 2**63 - 1) | _word, max_size=3),  # bigint
        "store": st.sampled_from([s.value for s in Store]),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return body


@settings(max_examples=200, deadline=None)
@given(canonical_bodies())
def test_facts_round_trip_through_the_log(body: dict[str, Any]) -> None:
    event = parse_event(body)
    facts = event.to_facts()
    assert json.loads(json.dumps(facts)) == facts  # JSON-ready
    assert event_from_facts(facts) == event
    assert event_from_facts(facts).to_facts() == facts
    assert None not in facts.values()


def test_chain_hash_is_stable_and_order_sensitive() -> None:
    facts = parse_event(valid()).to_facts()
    entry = entry_for_hash(
        source="custom",
        external_id="evt-1",
        app_id="com.example.app",
        subscription_key="com.example.app/other/1000000123",
        received_at="2024-03-01T10:00:01.000000Z",
        historical=False,
        raw=b'{"id":"evt-1"}',
        facts=facts,
    )
    reordered = json.loads(json.dumps(entry))
    reordered = dict(reversed(list(reordered.items())))
    assert canonical_bytes(entry) == canonical_bytes(reordered)  # key order does not matter
    first = chain_hash(GENESIS, entry)
    assert first == chain_hash(GENESIS, reordered)
    assert len(first) == 32
    second = chain_hash(first, entry)
    assert second != first
    assert chain_hash(GENESIS, {**entry, "historical": True}) != first
    assert chain_hash(GENESIS, {**entry, "raw_sha256": "0" * 64}) != first


def test_issue_14_fields_parse_round_trip_and_stay_out_of_older_facts() -> None:
    body = valid(type="refund", price="-2.49", refund_id="re_2", purchased_at="2024-02-01T10:00:00Z",
                 is_trial_conversion=True, takehome_percentage=0.7, aliases=["a", "b", "a"])
    event = parse_event(body)
    assert (event.refund_id, event.is_trial_conversion, event.takehome_percentage, event.aliases) == (
        "re_2", True, Decimal("0.7"), ("a", "b"))
    assert event.purchased_at == datetime(2024, 2, 1, 10, tzinfo=UTC)
    assert event_from_facts(event.to_facts()) == event
    assert set(parse_event(valid()).to_facts()) & {"refund_id", "purchased_at", "aliases", "takehome_percentage",
                                                   "is_trial_conversion"} == set()


@pytest.mark.parametrize(("name", "value"), [
    ("aliases", "u-1"), ("aliases", ["ok", 3]), ("aliases", [""]), ("takehome_percentage", 1.5),
    ("takehome_percentage", "x"), ("is_trial_conversion", "yes"), ("purchased_at", "yesterday"),
])
def test_issue_14_fields_refuse_bad_values_by_name(name: str, value: Any) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(valid(**{name: value}))
    assert (caught.value.field or "").startswith(name)
