"""Apple adapter: real signature verification on self-minted chains, refusals, and the mapping table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from apple_signing import (
    APP_APPLE_ID,
    BUNDLE_ID,
    DEFAULT_SIGNED_DATE,
    SigningCA,
    body,
    make_ca,
    ms,
    notification,
    notification_payload,
    renewal_info,
    sign,
    tamper,
    transaction,
)
from appstoreserverlibrary.models.LibraryUtility import _get_cattrs_converter
from appstoreserverlibrary.models.ResponseBodyV2DecodedPayload import ResponseBodyV2DecodedPayload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, MalformedPayload, PayloadRejected
from subledger.core.events import CanonicalEvent, Environment, EventType, PeriodType, Reason, Source, Store
from subledger.core.lifecycle import TransitionKind, fold
from subledger.core.sources import Notification
from subledger.core.sources.apple import (
    STORED_ONLY,
    AppleAdapter,
    AppleConfig,
    parse_notification,
    stream_key,
    unverified_bundle_id,
)

CA = make_ca()
OTHER_CA = make_ca(name="Impostor")
OTID = "2000000111111111"


def config(**overrides: Any) -> AppleConfig:
    values: dict[str, Any] = {
        "bundle_id": BUNDLE_ID,
        "app_apple_id": APP_APPLE_ID,
        "root_certificates": (CA.root_der,),
    }
    values.update(overrides)
    return AppleConfig(**values)


ADAPTER = AppleAdapter(config())


def parse(raw: bytes, adapter: AppleAdapter = ADAPTER) -> Notification:
    return adapter.parse(raw)


def only(n: Notification) -> CanonicalEvent:
    assert len(n.events) == 1, n.events
    return n.events[0]


# --- verification ------------------------------------------------------------------------------


def test_valid_notification_verifies_and_keys_on_notification_uuid() -> None:
    raw = notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=transaction(), notification_uuid="uuid-1")
    n = parse(raw)
    assert n.source is Source.APPLE
    assert n.external_id == "uuid-1"
    assert n.app_id == BUNDLE_ID
    assert n.kind == "SUBSCRIBED/INITIAL_BUY"
    assert only(n).id == "uuid-1"
    assert n.subscription_key == f"{BUNDLE_ID}/app_store/{OTID}"


def test_production_notification_verifies_with_app_apple_id() -> None:
    raw = notification(CA, "DID_RENEW", txn=transaction(environment="Production"), environment="Production")
    assert only(parse(raw)).environment is Environment.PRODUCTION


def test_tampered_payload_is_rejected() -> None:
    signed = sign(notification_payload(CA, "DID_RENEW", txn=transaction()), CA)
    forged = tamper(signed, notificationType="REFUND")
    with pytest.raises(BadSignature) as err:
        parse(body(forged))
    assert err.value.field == "signedPayload"


def test_missing_x5c_is_rejected() -> None:
    with pytest.raises(BadSignature):
        parse(body(sign(notification_payload(CA, "TEST"), CA, x5c=False)))


def test_chain_from_another_root_is_rejected() -> None:
    with pytest.raises(BadSignature):
        parse(body(sign(notification_payload(OTHER_CA, "TEST"), OTHER_CA)))


def test_leaf_key_not_matching_the_chain_is_rejected() -> None:
    with pytest.raises(BadSignature):
        parse(body(sign(notification_payload(CA, "TEST"), CA, key=OTHER_CA.leaf_key)))


@pytest.mark.parametrize(("leaf", "intermediate"), [(False, True), (True, False)])
def test_chain_without_apple_marker_oids_is_rejected(leaf: bool, intermediate: bool) -> None:
    ca = make_ca(leaf_marker=leaf, intermediate_marker=intermediate)
    adapter = AppleAdapter(config(root_certificates=(ca.root_der,)))
    with pytest.raises(BadSignature):
        adapter.parse(notification(ca, "TEST"))


def test_chain_of_two_certificates_is_rejected() -> None:
    with pytest.raises(BadSignature) as err:
        parse(body(sign(notification_payload(CA, "TEST"), CA, x5c=CA.x5c[:2])))
    assert "3 certificates" in err.value.reason


def test_expired_certificates_are_rejected_at_signed_date() -> None:
    ca = make_ca(not_before=datetime(2020, 1, 1, tzinfo=UTC), not_after=datetime(2021, 1, 1, tzinfo=UTC))
    adapter = AppleAdapter(config(root_certificates=(ca.root_der,)))
    with pytest.raises(BadSignature):
        adapter.parse(notification(ca, "TEST"))
    # Offline verification dates the chain at signedDate: an old notification still verifies.
    old = adapter.parse(notification(ca, "TEST", signed=datetime(2020, 6, 1, tzinfo=UTC)))
    assert old.kind == "TEST"


@pytest.mark.parametrize("algorithm", ["HS256", "none"])
def test_non_es256_is_rejected(algorithm: str) -> None:
    with pytest.raises(PayloadRejected):
        parse(body(sign(notification_payload(CA, "TEST"), CA, algorithm=algorithm)))


def test_wrong_bundle_id_is_rejected() -> None:
    with pytest.raises(BadSignature) as err:
        parse(notification(CA, "TEST", bundle_id="com.example.other"))
    assert err.value.field == "bundleId"


def test_wrong_app_apple_id_is_rejected_in_production() -> None:
    raw = notification(CA, "TEST", environment="Production", app_apple_id=APP_APPLE_ID + 1)
    with pytest.raises(BadSignature) as err:
        parse(raw)
    assert err.value.field == "appAppleId"


def test_wrong_app_apple_id_is_rejected_in_sandbox_when_present() -> None:
    with pytest.raises(BadSignature) as err:
        parse(notification(CA, "TEST", app_apple_id=APP_APPLE_ID + 1))
    assert err.value.field == "appAppleId"
    assert parse(notification(CA, "TEST", app_apple_id=None)).kind == "TEST"  # Sandbox omits it


def test_environment_not_accepted_is_rejected() -> None:
    sandbox_only = AppleAdapter(config(environments=frozenset({"Sandbox"}), app_apple_id=None))
    with pytest.raises(BadSignature) as err:
        sandbox_only.parse(notification(CA, "TEST", environment="Production"))
    assert err.value.field == "environment"


@pytest.mark.parametrize("environment", ["LocalTesting", "Xcode", "Staging"])
def test_unsigned_environments_are_never_accepted(environment: str) -> None:
    # The library skips signature checks for LocalTesting/Xcode: an unsigned token must not pass.
    import jwt

    unsigned = jwt.encode(notification_payload(CA, "TEST", environment=environment), None, algorithm="none")
    with pytest.raises(BadSignature):
        parse(body(unsigned))


def test_inner_transaction_is_verified_separately() -> None:
    forged_txn = sign(transaction(price=1), OTHER_CA)
    data = {
        "environment": "Sandbox",
        "bundleId": BUNDLE_ID,
        "appAppleId": APP_APPLE_ID,
        "signedTransactionInfo": forged_txn,
    }
    raw = body(sign(notification_payload(CA, "DID_RENEW", data=data), CA))
    with pytest.raises(BadSignature) as err:
        parse(raw)
    assert err.value.field == "data.signedTransactionInfo"


def test_inner_renewal_info_is_verified_separately() -> None:
    data = {
        "environment": "Sandbox",
        "bundleId": BUNDLE_ID,
        "signedTransactionInfo": sign(transaction(), CA),
        "signedRenewalInfo": tamper(sign(renewal_info(), CA), autoRenewStatus=0),
    }
    with pytest.raises(BadSignature) as err:
        parse(body(sign(notification_payload(CA, "DID_CHANGE_RENEWAL_STATUS", data=data), CA)))
    assert err.value.field == "data.signedRenewalInfo"


def test_inner_transaction_for_another_app_is_rejected() -> None:
    raw = notification(CA, "DID_RENEW", txn=transaction(bundle_id="com.example.other"))
    with pytest.raises(BadSignature) as err:
        parse(raw)
    assert err.value.field == "bundleId"
    assert "com.example.other" in err.value.reason


def test_inner_transaction_from_another_environment_is_rejected() -> None:
    raw = notification(CA, "DID_RENEW", txn=transaction(environment="Production"))
    with pytest.raises(BadSignature) as err:
        parse(raw)
    assert err.value.field == "environment"


def test_renewal_info_of_another_subscription_is_rejected() -> None:
    raw = notification(CA, "DID_RENEW", txn=transaction(), renewal=renewal_info(original_transaction_id="999"))
    with pytest.raises(InvalidEvent):
        parse(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"signedPayload": 5}',
        b"{}",
        b'{"signedPayload": "a.b"}',
        b'{"signedPayload": "a.!!!.c"}',
        b"\xff\xfe",
    ],
)
def test_malformed_bodies_are_rejected(raw: bytes) -> None:
    with pytest.raises(MalformedPayload):
        parse(raw)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        config(app_apple_id=None)  # Production accepted by default
    with pytest.raises(ConfigError):
        config(environments=frozenset({"LocalTesting"}))
    with pytest.raises(ConfigError):
        config(root_certificates=(b"not der",))
    with pytest.raises(ConfigError):
        config(root_certificates=())
    assert config(app_id="fitness").app_id == "fitness"
    assert config().app_id == BUNDLE_ID


def test_verifier_can_be_injected() -> None:
    class Fake:
        def verify_and_decode_notification(self, signed_payload: str, /) -> ResponseBodyV2DecodedPayload:
            claims = {"notificationType": "TEST", "notificationUUID": "fake-1", "signedDate": 1}
            converter = _get_cattrs_converter(ResponseBodyV2DecodedPayload)
            return converter.structure(claims, ResponseBodyV2DecodedPayload)

        def verify_and_decode_signed_transaction(self, signed: str, /) -> Any:
            raise AssertionError("not called")

        def verify_and_decode_renewal_info(self, signed: str, /) -> Any:
            raise AssertionError("not called")

    adapter = AppleAdapter(config(), verifiers={"Sandbox": Fake()})
    assert adapter.parse(notification(OTHER_CA, "TEST")).external_id == "fake-1"


def test_unverified_bundle_id_routes_without_trusting() -> None:
    assert unverified_bundle_id(notification(OTHER_CA, "TEST", bundle_id="com.x")) == "com.x"
    assert unverified_bundle_id(b"junk") is None


def test_parse_notification_convenience() -> None:
    assert parse_notification(notification(CA, "TEST"), config()).kind == "TEST"


# --- mapping -----------------------------------------------------------------------------------

PURCHASED = datetime(2025, 6, 1, 11, 59, tzinfo=UTC)
SIGNED = DEFAULT_SIGNED_DATE


def test_initial_buy_trial_is_trial_purchase() -> None:
    e = only(parse(notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=transaction(trial=True))))
    assert e.type is EventType.PURCHASE
    assert e.period_type is PeriodType.TRIAL
    assert e.subscription_id == OTID
    assert e.app_user_id == "7e3fb20b-4cdb-47cc-936d-99d65f608138"
    assert e.occurred_at == PURCHASED
    assert e.expires_at == PURCHASED + timedelta(days=30)
    assert e.environment is Environment.SANDBOX
    assert e.store is Store.APP_STORE
    assert e.country_code == "US"
    assert e.price == 0


def test_initial_buy_paid_has_decimal_price_from_milliunits() -> None:
    e = only(parse(notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=transaction(price=9990))))
    assert (e.type, e.period_type, e.price, e.currency) == (
        EventType.PURCHASE,
        PeriodType.NORMAL,
        Decimal("9.99"),
        "USD",
    )
    assert e.transaction_id == OTID
    assert e.product_id == "com.example.fitness.monthly"


def test_price_milliunits_in_zero_decimal_currency() -> None:
    e = only(parse(notification(CA, "DID_RENEW", txn=transaction(price=300000, currency="JPY"))))
    assert (e.price, e.currency) == (Decimal(300), "JPY")


def test_introductory_pay_as_you_go_is_intro() -> None:
    txn = transaction(price=990, offerType=1, offerDiscountType="PAY_AS_YOU_GO")
    assert only(parse(notification(CA, "SUBSCRIBED", "RESUBSCRIBE", txn=txn))).period_type is PeriodType.INTRO


def test_promotional_free_offer_is_not_a_trial() -> None:
    txn = transaction(price=0, offerType=3, offerDiscountType="FREE_TRIAL")
    e = only(parse(notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=txn)))
    assert e.period_type is PeriodType.NORMAL
    assert e.attributes["offer_type"] == 3


def test_resubscribe_is_purchase() -> None:
    e = only(parse(notification(CA, "SUBSCRIBED", "RESUBSCRIBE", txn=transaction())))
    assert e.type is EventType.PURCHASE


def test_did_renew_and_billing_recovery() -> None:
    txn = transaction(transaction_id="t2")
    assert only(parse(notification(CA, "DID_RENEW", txn=txn))).type is EventType.RENEWAL
    recovered = only(parse(notification(CA, "DID_RENEW", "BILLING_RECOVERY", txn=txn)))
    assert recovered.type is EventType.BILLING_RECOVERED
    assert recovered.transaction_id == "t2"


@pytest.mark.parametrize(
    ("subtype", "auto_renew", "expected"),
    [
        ("AUTO_RENEW_DISABLED", False, EventType.AUTO_RENEW_DISABLED),
        ("AUTO_RENEW_ENABLED", True, EventType.AUTO_RENEW_ENABLED),
        (None, False, EventType.AUTO_RENEW_DISABLED),
        (None, True, EventType.AUTO_RENEW_ENABLED),
    ],
)
def test_renewal_status(subtype: str | None, auto_renew: bool, expected: EventType) -> None:
    raw = notification(
        CA, "DID_CHANGE_RENEWAL_STATUS", subtype, txn=transaction(), renewal=renewal_info(auto_renew=auto_renew)
    )
    e = only(parse(raw))
    assert e.type is expected
    assert e.occurred_at == SIGNED


def test_auto_renew_disabled_after_price_increase_carries_reason() -> None:
    renewal = renewal_info(auto_renew=False, expirationIntent=3)
    raw = notification(CA, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", txn=transaction(), renewal=renewal)
    assert only(parse(raw)).reason is Reason.PRICE_INCREASE


@pytest.mark.parametrize("subtype", [None, "GRACE_PERIOD"])
def test_did_fail_to_renew_is_billing_issue(subtype: str | None) -> None:
    renewal = renewal_info(gracePeriodExpiresDate=ms(SIGNED + timedelta(days=16)), isInBillingRetryPeriod=True)
    e = only(parse(notification(CA, "DID_FAIL_TO_RENEW", subtype, txn=transaction(), renewal=renewal)))
    assert e.type is EventType.BILLING_ISSUE
    assert e.attributes["grace_period_expires_at"].startswith("2025-06-17")


@pytest.mark.parametrize(
    ("subtype", "intent", "reason"),
    [
        ("VOLUNTARY", None, Reason.UNSUBSCRIBE),
        ("BILLING_RETRY", None, Reason.BILLING_ERROR),
        ("PRICE_INCREASE", None, Reason.PRICE_INCREASE),
        ("PRODUCT_NOT_FOR_SALE", None, Reason.UNKNOWN),
        (None, 2, Reason.BILLING_ERROR),
        (None, None, Reason.UNKNOWN),
    ],
)
def test_expired_reasons(subtype: str | None, intent: int | None, reason: Reason) -> None:
    renewal = renewal_info(auto_renew=False, **({} if intent is None else {"expirationIntent": intent}))
    e = only(parse(notification(CA, "EXPIRED", subtype, txn=transaction(), renewal=renewal)))
    assert (e.type, e.reason) == (EventType.EXPIRATION, reason)


def test_grace_period_expired_is_billing_error_expiration() -> None:
    e = only(parse(notification(CA, "GRACE_PERIOD_EXPIRED", txn=transaction())))
    assert (e.type, e.reason) == (EventType.EXPIRATION, Reason.BILLING_ERROR)


def test_refund_has_negative_price_of_the_transaction_at_revocation() -> None:
    revoked = SIGNED - timedelta(hours=1)
    txn = transaction(transaction_id="t9", revocationDate=ms(revoked), revocationReason=0, revocationType="REFUND_FULL")
    e, *_ = parse(notification(CA, "REFUND", txn=txn)).events  # issue 14: then the expiration it causes
    assert (e.type, e.price, e.currency, e.transaction_id) == (EventType.REFUND, Decimal("-9.99"), "USD", "t9")
    assert e.occurred_at == revoked


def test_prorated_refund_uses_revocation_percentage() -> None:
    txn = transaction(price=10000, revocationType="REFUND_PRORATED", revocationPercentage=50000)
    assert parse(notification(CA, "REFUND", txn=txn)).events[0].price == Decimal("-5")


def test_refund_of_the_current_period_also_ends_access_an_earlier_one_does_not() -> None:
    revoked = SIGNED - timedelta(hours=1)
    current = transaction(transaction_id="t9", revocationDate=ms(revoked), expiresDate=ms(revoked + timedelta(days=9)))
    refund, ended = parse(notification(CA, "REFUND", txn=current)).events
    assert (refund.type, ended.type, ended.reason, ended.occurred_at) == (
        EventType.REFUND, EventType.EXPIRATION, Reason.CUSTOMER_SUPPORT, revoked)
    assert refund.id < ended.id  # same instant: the refund sorts first
    earlier = transaction(transaction_id="t8", revocationDate=ms(revoked), expiresDate=ms(revoked - timedelta(days=9)))
    assert [e.type for e in parse(notification(CA, "REFUND", txn=earlier)).events] == [EventType.REFUND]


def test_refund_reversed() -> None:
    e = only(parse(notification(CA, "REFUND_REVERSED", txn=transaction(transaction_id="t9"))))
    assert (e.type, e.transaction_id) == (EventType.REFUND_REVERSED, "t9")


def test_refund_of_a_consumable_is_stored_only() -> None:
    txn = transaction(type="Consumable", revocationDate=ms(SIGNED))
    n = parse(notification(CA, "REFUND", txn=txn))
    assert n.events == ()


def test_upgrade_is_product_change_then_charged_renewal() -> None:
    txn = transaction(transaction_id="t3", product_id="com.example.fitness.yearly", price=59990)
    n = parse(notification(CA, "DID_CHANGE_RENEWAL_PREF", "UPGRADE", txn=txn, notification_uuid="u-up"))
    change, renewal = n.events
    assert (change.id, change.type, change.new_product_id) == ("u-up", EventType.PRODUCT_CHANGE, txn["productId"])
    assert (renewal.id, renewal.type, renewal.price) == ("u-up#1", EventType.RENEWAL, Decimal("59.99"))
    assert change.occurred_at == renewal.occurred_at
    assert change.subscription_key == renewal.subscription_key


def test_downgrade_is_scheduled_product_change() -> None:
    renewal = renewal_info(auto_renew_product_id="com.example.fitness.basic")
    e = only(parse(notification(CA, "DID_CHANGE_RENEWAL_PREF", "DOWNGRADE", txn=transaction(), renewal=renewal)))
    assert (e.type, e.product_id, e.new_product_id) == (
        EventType.PRODUCT_CHANGE,
        "com.example.fitness.monthly",
        "com.example.fitness.basic",
    )


def test_offer_redeemed_upgrade_is_product_change() -> None:
    txn = transaction(product_id="com.example.fitness.yearly")
    n = parse(notification(CA, "OFFER_REDEEMED", "UPGRADE", txn=txn))
    assert [e.type for e in n.events] == [EventType.PRODUCT_CHANGE, EventType.RENEWAL]


def test_renewal_extended_moves_expiry() -> None:
    new_expiry = SIGNED + timedelta(days=40)
    e = only(parse(notification(CA, "RENEWAL_EXTENDED", txn=transaction(expires=new_expiry))))
    assert (e.type, e.expires_at) == (EventType.EXTENDED, new_expiry)


def test_one_time_charge_is_one_time_purchase() -> None:
    txn = transaction(type="Non-Consumable", product_id="com.example.fitness.lifetime", price=49990, expiresDate=None)
    e = only(parse(notification(CA, "ONE_TIME_CHARGE", txn=txn)))
    assert (e.type, e.subscription_id, e.price) == (EventType.ONE_TIME_PURCHASE, None, Decimal("49.99"))


def test_revoke_is_expiration() -> None:
    txn = transaction(inAppOwnershipType="FAMILY_SHARED", revocationType="FAMILY_REVOKE", revocationDate=ms(SIGNED))
    assert only(parse(notification(CA, "REVOKE", txn=txn))).type is EventType.EXPIRATION


@pytest.mark.parametrize("kind", sorted(STORED_ONLY - {"EXTERNAL_PURCHASE_TOKEN", "RESCIND_CONSENT"}))
def test_informational_types_are_stored_only(kind: str) -> None:
    n = parse(notification(CA, kind, txn=transaction(), renewal=renewal_info()))
    assert n.events == ()
    assert n.subscription_key == stream_key(BUNDLE_ID, OTID)


def test_test_notification_is_acknowledged_with_zero_events() -> None:
    n = parse(notification(CA, "TEST", notification_uuid="t-1"))
    assert (n.kind, n.external_id, n.events, n.subscription_key) == ("TEST", "t-1", (), None)


def test_summary_notification_is_stored_only() -> None:
    summary = {"environment": "Sandbox", "bundleId": BUNDLE_ID, "requestIdentifier": "r", "succeededCount": 3}
    payload = notification_payload(CA, "RENEWAL_EXTENSION", "SUMMARY", data={})
    del payload["data"]
    payload["summary"] = summary
    assert parse(body(sign(payload, CA))).events == ()


@pytest.mark.parametrize(
    ("kind", "subtype"),
    [("BRAND_NEW_TYPE", None), ("SUBSCRIBED", "SOMETHING_NEW"), ("DID_RENEW", "FUTURE"), ("EXPIRED", "NEW")],
)
def test_unknown_types_and_subtypes_are_stored_without_error(kind: str, subtype: str | None) -> None:
    n = parse(notification(CA, kind, subtype, txn=transaction()))
    assert n.events == ()
    assert n.kind == (f"{kind}/{subtype}" if subtype else kind)


def test_missing_transaction_for_a_charge_is_invalid() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse(notification(CA, "DID_RENEW"))
    assert err.value.field == "data.signedTransactionInfo"


def test_app_id_override() -> None:
    adapter = AppleAdapter(config(app_id="fitness"))
    e = only(adapter.parse(notification(CA, "DID_RENEW", txn=transaction())))
    assert e.app_id == "fitness"


def test_folded_apple_lifecycle_derives_rc_transitions() -> None:
    """The fold, not the adapter, decides trial_started / trial_converted / trial_cancelled."""
    t0 = datetime(2025, 6, 1, tzinfo=UTC)
    steps = [
        notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=transaction(trial=True, purchase=t0), signed=t0),
        notification(
            CA,
            "DID_RENEW",
            txn=transaction(transaction_id="t2", purchase=t0 + timedelta(days=7)),
            signed=t0 + timedelta(days=7),
        ),
        notification(
            CA,
            "DID_CHANGE_RENEWAL_STATUS",
            "AUTO_RENEW_DISABLED",
            txn=transaction(transaction_id="t2", purchase=t0 + timedelta(days=7)),
            renewal=renewal_info(auto_renew=False),
            signed=t0 + timedelta(days=10),
        ),
        notification(CA, "EXPIRED", "VOLUNTARY", txn=transaction(transaction_id="t2"), signed=t0 + timedelta(days=37)),
    ]
    events = [e for raw in reversed(steps) for e in parse(raw).events]  # arrival order does not matter
    kinds = [t.kind for t in fold(events).transitions]
    assert kinds == [
        TransitionKind.TRIAL_STARTED,
        TransitionKind.TRIAL_CONVERTED,
        TransitionKind.CANCELLATION,
        TransitionKind.EXPIRATION,
    ]


# --- hostile input -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    json_values,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(["", "Sandbox", "Production", "LocalTesting", "SUBSCRIBED", "FREE_TRIAL", "USD", "usd"]),
)
TXN_FIELDS = [
    "originalTransactionId",
    "transactionId",
    "productId",
    "purchaseDate",
    "expiresDate",
    "price",
    "currency",
    "offerType",
    "offerDiscountType",
    "revocationDate",
    "revocationPercentage",
    "type",
    "appAccountToken",
    "storefront",
    "signedDate",
]
NOTE_FIELDS = ["notificationType", "subtype", "notificationUUID", "signedDate", "data", "version", "summary"]


def _hostile_signed(ca: SigningCA, draw: Any) -> bytes:
    txn = transaction()
    for name in draw(st.lists(st.sampled_from(TXN_FIELDS), max_size=3)):
        txn[name] = draw(field_values)
    kind = draw(st.sampled_from(["SUBSCRIBED", "DID_RENEW", "REFUND", "EXPIRED", "ONE_TIME_CHARGE", "X"]))
    payload = notification_payload(ca, kind, draw(st.sampled_from([None, "INITIAL_BUY", "UPGRADE"])), txn=txn)
    for name in draw(st.lists(st.sampled_from(NOTE_FIELDS), max_size=2)):
        payload[name] = draw(field_values)
    return body(sign(payload, ca))


@st.composite
def hostile_bodies(draw: Any) -> bytes:
    choice = draw(st.integers(min_value=0, max_value=5))
    if choice == 0:
        return bytes(draw(st.binary(max_size=200)))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    if choice == 2:
        return json.dumps({"signedPayload": draw(st.text(max_size=200))}).encode()
    if choice == 3:
        # signed by an untrusted chain, arbitrary claims
        claims = draw(st.dictionaries(st.sampled_from(NOTE_FIELDS), field_values, max_size=5))
        return body(sign(claims, OTHER_CA))
    if choice == 4:
        # signed by the trusted chain, arbitrary claims
        claims = draw(st.dictionaries(st.sampled_from(NOTE_FIELDS), field_values, max_size=5))
        claims.setdefault("data", {"environment": "Sandbox", "bundleId": BUNDLE_ID})
        return body(sign(claims, CA))
    return _hostile_signed(CA, draw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_bodies())
def test_hostile_bodies_only_raise_payload_rejected(raw: bytes) -> None:
    try:
        n = parse(raw)
    except PayloadRejected:
        return
    assert isinstance(n, Notification)
    for event in n.events:
        assert event.subscription_key == n.subscription_key
