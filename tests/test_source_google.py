"""The Google Play adapter, pure: push parsing, the fetch plan, and the mapping per store-events.md §4.2."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fake_google import (
    PACKAGE,
    developer_notification,
    order,
    push_body,
    subscription_v2,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subledger.core.errors import InvalidEvent, MalformedPayload, PayloadRejected
from subledger.core.events import Environment, EventType, PeriodType, Reason
from subledger.core.sources import Notification
from subledger.core.sources.google import (
    Failure,
    Fetched,
    GoogleConfig,
    map_push,
    order_to_fetch,
    parse_push,
)

CONFIG = GoogleConfig(app_id="play-app", package_name=PACKAGE)
T0 = datetime(2026, 10, 1, 10, tzinfo=UTC)
EXPIRY = T0 + timedelta(days=30)
ORDER = "GPA.3333-4137-0319-36762"
TOKEN = "tok-A"

# store-events.md §5 G1 and G2, verbatim (G2's expiry placeholder filled in)
G1 = {"version": "1.0", "packageName": "com.some.thing", "eventTimeMillis": "1503349566168",
      "subscriptionNotification": {"version": "1.0", "notificationType": 4, "purchaseToken": "PURCHASE_TOKEN",
                                   "subscriptionId": "my.sku"}}
G2 = {"kind": "androidpublisher#subscriptionPurchaseV2", "startTime": "2022-04-22T18:39:58.270Z", "regionCode": "US",
      "subscriptionState": "SUBSCRIPTION_STATE_ACTIVE", "latestOrderId": "GPA.3333-4137-0319-36762",
      "acknowledgementState": "ACKNOWLEDGEMENT_STATE_PENDING",
      "lineItems": [{"productId": "sub_variant_plan01", "expiryTime": "2022-04-29T18:39:58.270Z",
                     "autoRenewingPlan": {"autoRenewEnabled": True}, "offerPhase": {"freeTrial": {}}}]}
G1_CONFIG = GoogleConfig(app_id="com.some.thing", package_name="com.some.thing")


def envelope(notification: dict[str, Any], message_id: str = "136969346945") -> bytes:
    return push_body(notification, message_id)


def mapped(kind: int, sub: dict[str, Any] | None, *, ord_: dict[str, Any] | None = None,
           chain: Any = None, token: str = TOKEN) -> Notification:
    push = parse_push(envelope(developer_notification(kind, token, T0)))
    return map_push(push, Fetched(subscription=sub, order=ord_), CONFIG, chain=chain)


def sub(**kw: Any) -> dict[str, Any]:
    return subscription_v2("premium_monthly", EXPIRY, order_id=kw.pop("order_id", ORDER), **kw)


def types(n: Notification) -> list[str]:
    return [e.type.value for e in n.events]


# --- the push --------------------------------------------------------------------------------


def test_g1_in_a_pubsub_envelope() -> None:
    push = parse_push(envelope(G1))
    assert (push.external_id, push.message_id, push.kind, push.family) == (
        "136969346945", "136969346945", "SUBSCRIPTION_PURCHASED", "subscription")
    assert push.subscription == "projects/example-project/subscriptions/play-rtdn"
    assert push.purchase_token == "PURCHASE_TOKEN"
    assert push.event_time == datetime(2017, 8, 21, 21, 6, 6, 168000, tzinfo=UTC)
    assert push.wants_subscription


def test_the_unwrapped_form_is_read_and_keyed_by_header_or_content() -> None:
    bare = json.dumps(G1).encode()
    push = parse_push(bare)
    assert push.external_id.startswith("rtdn:") and push.kind == "SUBSCRIPTION_PURCHASED"
    assert parse_push(json.dumps(G1, indent=2).encode()).external_id == push.external_id  # same content, same id
    assert parse_push(bare, message_id="42").external_id == "42"


def test_urlsafe_base64_data_is_accepted() -> None:
    data = base64.urlsafe_b64encode(json.dumps(G1).encode()).decode().rstrip("=")
    body = json.dumps({"message": {"data": data, "messageId": "7"}, "subscription": "s"}).encode()
    assert parse_push(body).purchase_token == "PURCHASE_TOKEN"


def test_test_notification_is_acknowledged_with_no_facts_and_no_fetch() -> None:
    push = parse_push(envelope(developer_notification(None, "", T0, family="test")))
    assert (push.kind, push.wants_subscription, push.wants_product) == ("TEST", False, False)
    n = map_push(push, Fetched(), CONFIG)
    assert (n.kind, n.events, n.subscription_key) == ("TEST", (), None)


def test_nul_in_stored_text_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        parse_push(envelope(G1, message_id="1\x002"))
    with pytest.raises(InvalidEvent):
        parse_push(envelope(developer_notification(2, "tok\x00", T0)))


@pytest.mark.parametrize(
    ("body", "error", "field"),
    [
        (b"not json", MalformedPayload, "body"),
        (b"[]", MalformedPayload, "body"),
        (b'{"message": {"data": "%%%", "messageId": "1"}}', MalformedPayload, "message.data"),
        (json.dumps({"message": {"data": base64.b64encode(b"[1]").decode(), "messageId": "1"}}).encode(),
         MalformedPayload, "message.data"),
        (json.dumps({"message": {"data": base64.b64encode(json.dumps(G1).encode()).decode()}}).encode(),
         MalformedPayload, "message.messageId"),
        (json.dumps({**G1, "eventTimeMillis": "soon"}).encode(), InvalidEvent, "eventTimeMillis"),
        (json.dumps({k: v for k, v in G1.items() if k != "packageName"}).encode(), MalformedPayload, "packageName"),
        (json.dumps({**G1, "subscriptionNotification": {"notificationType": 4}}).encode(), InvalidEvent,
         "subscriptionNotification.purchaseToken"),
    ],
)
def test_bad_pushes_name_the_field(body: bytes, error: type[PayloadRejected], field: str) -> None:
    with pytest.raises(error) as raised:
        parse_push(body)
    assert raised.value.field == field


# --- what to fetch ---------------------------------------------------------------------------


def test_a_purchase_fetches_its_own_first_order_even_after_renewals() -> None:
    latest = sub(order_id=ORDER + "..3")
    purchase = parse_push(envelope(developer_notification(4, TOKEN, T0)))
    renewal = parse_push(envelope(developer_notification(2, TOKEN, T0)))
    cancel = parse_push(envelope(developer_notification(3, TOKEN, T0)))
    voided = parse_push(envelope(developer_notification(None, TOKEN, T0, family="voided", order_id="GPA.9")))
    assert order_to_fetch(purchase, latest, None) == ORDER
    assert order_to_fetch(renewal, latest, None) == ORDER + "..3"
    assert order_to_fetch(cancel, latest, None) is None
    assert order_to_fetch(voided, None, None) == "GPA.9"


# --- mapping (store-events.md §4.2) --------------------------------------------------------


def test_g2_a_new_trial_purchase() -> None:
    push = parse_push(envelope(G1))
    n = map_push(push, Fetched(subscription=G2), G1_CONFIG)
    (event,) = n.events
    assert (event.type, event.period_type, event.product_id) == (EventType.PURCHASE, PeriodType.TRIAL,
                                                                 "sub_variant_plan01")
    assert (event.subscription_id, event.transaction_id, event.country_code) == ("PURCHASE_TOKEN", ORDER, "US")
    assert event.expires_at == datetime(2022, 4, 29, 18, 39, 58, 270000, tzinfo=UTC)
    assert event.attributes["google_fetched"]["subscriptionsv2"] == G2
    assert n.kind == "SUBSCRIPTION_PURCHASED" and n.external_id == "136969346945"


@pytest.mark.parametrize(
    ("phase", "period"),
    [("freeTrial", PeriodType.TRIAL), ("introductoryPrice", PeriodType.INTRO), ("basePrice", PeriodType.NORMAL),
     ("prorationPeriod", PeriodType.NORMAL)],
)
def test_offer_phase_decides_the_period_type(phase: str, period: PeriodType) -> None:
    (event,) = mapped(4, sub(phase=phase)).events
    assert event.period_type is period


def test_the_orders_phase_and_money_win_over_the_current_state() -> None:
    # fetched after the conversion: the subscription says basePrice, the purchase's own order a free trial
    (event,) = mapped(4, sub(order_id=ORDER + "..0"), ord_=order(ORDER, "premium_monthly", "0",
                                                                  phase="freeTrial")).events
    assert (event.period_type, event.price, event.currency, event.transaction_id) == (
        PeriodType.TRIAL, Decimal(0), "USD", ORDER)


def test_renewal_money_is_the_orders_total_else_the_recurring_price_estimate() -> None:
    (paid,) = mapped(2, sub(), ord_=order(ORDER, "premium_monthly", "12.49", currency="EUR")).events
    assert (paid.type, paid.price, paid.currency) == (EventType.RENEWAL, Decimal("12.49"), "EUR")
    (estimate,) = mapped(2, sub(price="9.99")).events
    assert (estimate.price, estimate.attributes["price_source"]) == (Decimal("9.99"), "recurring_price")
    (jpy,) = mapped(2, sub(), ord_=order(ORDER, "premium_monthly", "300", currency="JPY")).events
    assert (jpy.price, jpy.currency) == (Decimal(300), "JPY")


@pytest.mark.parametrize(
    ("kind", "kw", "expected", "reason"),
    [
        (1, {}, ["billing_recovered"], None),
        (2, {}, ["renewal"], None),
        (3, {"canceled": "userInitiatedCancellation", "auto_renew": False}, ["auto_renew_disabled"],
         Reason.UNSUBSCRIBE),
        (3, {"canceled": "systemInitiatedCancellation"}, ["auto_renew_disabled"], Reason.BILLING_ERROR),
        (3, {"canceled": "developerInitiatedCancellation"}, ["auto_renew_disabled"], Reason.DEVELOPER_INITIATED),
        (3, {"canceled": "replacementCancellation"}, [], None),
        (5, {"state": "SUBSCRIPTION_STATE_ON_HOLD"}, ["billing_issue"], None),
        (6, {"state": "SUBSCRIPTION_STATE_IN_GRACE_PERIOD"}, ["billing_issue"], None),
        (7, {}, ["auto_renew_enabled"], None),
        (9, {}, ["extended"], None),
        (10, {"paused_until": EXPIRY + timedelta(days=30)}, ["paused"], None),
        (11, {}, ["pause_scheduled"], None),
        (12, {}, ["refund", "expiration"], Reason.CUSTOMER_SUPPORT),
        (13, {"canceled": "userInitiatedCancellation"}, ["expiration"], Reason.UNSUBSCRIBE),
        (13, {}, ["expiration"], Reason.UNKNOWN),
        (13, {"canceled": "replacementCancellation"}, [], None),
        (17, {}, ["product_change"], None),
        (18, {}, ["auto_renew_disabled"], Reason.UNSUBSCRIBE),
    ],
)
def test_each_notification_type_states_its_facts(kind: int, kw: dict[str, Any], expected: list[str],
                                                  reason: Reason | None) -> None:
    n = mapped(kind, sub(**kw))
    assert types(n) == expected
    assert n.subscription_key == f"play-app/play_store/{TOKEN}"
    if reason is not None:
        assert n.events[-1].reason is reason
    assert all(e.occurred_at == T0 for e in n.events)
    assert [e.id for e in n.events] == ["136969346945", "136969346945#1"][: len(n.events)]


@pytest.mark.parametrize("kind", [8, 19, 20, 22, 99])
def test_informational_types_are_stored_only_without_a_fetch(kind: int) -> None:
    push = parse_push(envelope(developer_notification(kind, TOKEN, T0)))
    assert not push.wants_subscription
    n = map_push(push, Fetched(), CONFIG)
    assert n.events == () and n.subscription_key == f"play-app/play_store/{TOKEN}"


def test_user_sandbox_and_country() -> None:
    (event,) = mapped(2, sub(user="u-42", test=True, region="DE")).events
    assert (event.app_user_id, event.environment, event.country_code) == ("u-42", Environment.SANDBOX, "DE")
    (anonymous,) = mapped(2, sub(user=None)).events
    assert anonymous.app_user_id is None and anonymous.environment is Environment.PRODUCTION


def test_a_linked_token_is_the_same_subscription_and_a_product_change() -> None:
    upgraded = sub(linked="tok-OLD", order_id="GPA.2")
    n = mapped(4, upgraded, ord_=order("GPA.2", "premium_yearly", "49.99"), token="tok-NEW")
    assert types(n) == ["product_change", "auto_renew_enabled", "renewal"]
    assert {e.subscription_id for e in n.events} == {"tok-OLD"}
    assert n.events[0].new_product_id == "premium_monthly"
    assert n.events[2].price == Decimal("49.99")
    # a longer chain: the log knows the old token's root
    rooted = mapped(4, upgraded, token="tok-NEW", chain={"tok-OLD": "tok-ROOT"}.get)
    assert {e.subscription_id for e in rooted.events} == {"tok-ROOT"}
    # no charge now (deferred proration): no renewal
    assert types(mapped(4, upgraded, ord_=order("GPA.2", "premium_yearly", "0"), token="tok-NEW")) == [
        "product_change", "auto_renew_enabled"]
    # a later notification of the new token finds its root itself, through the lookup or the link
    assert {e.subscription_id for e in mapped(2, upgraded, token="tok-NEW").events} == {"tok-OLD"}
    assert {e.subscription_id for e in mapped(2, upgraded, token="tok-NEW", chain={"tok-NEW": "r"}.get).events} == {
        "r"}


def test_a_resubscribe_after_expiry_joins_the_expired_subscription() -> None:
    again = sub()
    again["outOfAppPurchaseContext"] = {"expiredPurchaseToken": "tok-EXPIRED"}
    (event,) = mapped(4, again, token="tok-NEW").events
    assert (event.type, event.subscription_id) == (EventType.PURCHASE, "tok-EXPIRED")


@pytest.mark.parametrize(("status", "suffix"), [(404, "NOT_FOUND"), (410, "GONE"), (400, "HTTP_400")])
def test_a_refused_fetch_is_stored_only_with_the_reason_in_the_kind(status: int, suffix: str) -> None:
    push = parse_push(envelope(developer_notification(2, TOKEN, T0)))
    n = map_push(push, Fetched(failure=Failure(status, "gone")), CONFIG, chain={TOKEN: "root"}.get)
    assert (n.kind, n.events, n.subscription_key) == (f"SUBSCRIPTION_RENEWED/{suffix}", (), "play-app/play_store/root")


def test_voided_purchases() -> None:
    voided = parse_push(envelope(developer_notification(None, TOKEN, T0, family="voided", order_id=ORDER)))
    (refund,) = map_push(voided, Fetched(subscription=sub(), order=order(ORDER, "m", "9.99")), CONFIG).events
    assert (refund.type, refund.price, refund.currency, refund.transaction_id) == (
        EventType.REFUND, Decimal("-9.99"), "USD", ORDER)
    partial = parse_push(envelope(developer_notification(None, TOKEN, T0, family="voided", order_id=ORDER,
                                                         refund_type=2)))
    (part,) = map_push(partial, Fetched(subscription=sub(), order=order(ORDER, "m", "9.99")), CONFIG).events
    assert part.price is None and part.attributes["refund_type"] == "partial"
    one_time = parse_push(envelope(developer_notification(None, TOKEN, T0, family="voided", order_id=ORDER,
                                                          product_type=2)))
    assert not one_time.wants_subscription
    assert map_push(one_time, Fetched(), CONFIG).events == ()


def test_one_time_products() -> None:
    push = parse_push(envelope(developer_notification(1, "tok-OTP", T0, family="one_time", sku="coins_100")))
    assert push.wants_product and not push.wants_subscription
    product = {"orderId": "GPA.77", "purchaseState": 0, "obfuscatedExternalAccountId": "u-7", "regionCode": "FR"}
    (event,) = map_push(push, Fetched(product=product, order=order("GPA.77", "coins_100", "1.99", currency="EUR")),
                        CONFIG).events
    assert (event.type, event.product_id, event.price, event.currency, event.transaction_id, event.app_user_id) == (
        EventType.ONE_TIME_PURCHASE, "coins_100", Decimal("1.99"), "EUR", "GPA.77", "u-7")
    assert event.subscription_id is None and event.environment is Environment.PRODUCTION
    assert map_push(push, Fetched(product={**product, "purchaseType": 0}), CONFIG).events[0].environment is (
        Environment.SANDBOX)
    pending = map_push(push, Fetched(product={**product, "purchaseState": 2}), CONFIG)
    assert (pending.kind, pending.events) == ("ONE_TIME_PRODUCT_PURCHASED/NOT_PURCHASED", ())
    canceled = parse_push(envelope(developer_notification(2, "tok-OTP", T0, family="one_time", sku="coins_100")))
    assert not canceled.wants_product and map_push(canceled, Fetched(), CONFIG).events == ()


def test_another_package_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        map_push(parse_push(envelope(G1)), Fetched(subscription=G2), CONFIG)


def test_a_fact_type_without_the_fetched_state_is_refused() -> None:
    with pytest.raises(InvalidEvent) as raised:
        mapped(2, None)
    assert raised.value.field == "purchases.subscriptionsv2"


def test_fetched_round_trips_through_its_stored_form() -> None:
    fetched = Fetched(subscription=sub(), order=order(ORDER, "m", "1"), failure=Failure(410, "gone"),
                      order_error="403: no")
    assert Fetched.from_json(json.loads(json.dumps(fetched.to_json()))) == fetched
    with pytest.raises(MalformedPayload):
        Fetched.from_json({"subscriptionsv2": [1]})


# --- hostile input ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
NOTIFICATION_FIELDS = ["packageName", "eventTimeMillis", "subscriptionNotification", "oneTimeProductNotification",
                       "voidedPurchaseNotification", "testNotification", "version"]
SUB_FIELDS = ["lineItems", "linkedPurchaseToken", "canceledStateContext", "externalAccountIdentifiers",
              "regionCode", "testPurchase", "outOfAppPurchaseContext", "subscriptionState"]


@st.composite
def hostile_pushes(draw: Any) -> bytes:
    """Garbage, random JSON, and real pushes with fields replaced by random JSON."""
    choice = draw(st.integers(min_value=0, max_value=4))
    if choice == 0:
        return bytes(draw(st.binary(max_size=200)))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    if choice == 2:
        return json.dumps({"message": {"data": draw(st.text(max_size=40)), "messageId": draw(json_values)},
                           "subscription": draw(json_values)}).encode()
    notification = developer_notification(draw(st.sampled_from([1, 2, 3, 4, 12, 13])), TOKEN, T0, package=PACKAGE)
    for name in draw(st.lists(st.sampled_from(NOTIFICATION_FIELDS), min_size=1, max_size=2)):
        notification[name] = draw(json_values)
    return envelope(notification) if choice == 3 else json.dumps(notification).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_pushes(), st.lists(st.sampled_from(SUB_FIELDS), max_size=3), json_values)
def test_hostile_pushes_and_state_only_raise_payload_rejected(raw: bytes, broken: list[str], junk: Any) -> None:
    state = sub()
    for name in broken:
        state[name] = junk
    try:
        push = parse_push(raw)
        n = map_push(push, Fetched(subscription=state, order=order(ORDER, "m", "9.99")), CONFIG,
                     chain=lambda token: None)
    except PayloadRejected:
        return
    assert isinstance(n, Notification)
    for e in n.events:
        assert e.subscription_key == n.subscription_key
