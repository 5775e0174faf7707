"""core/sources/amazon.py: the SNS envelope and its signature, the RTN message, and the mapping of
each notification type (with the receipt RVS answered) to canonical facts. Pure: no server, no DB."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fake_amazon import EXPIRED, GOOD, OTHER, PACKAGE, USER, receipt, rtn_message, sns_body

from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, MalformedPayload
from subledger.core.events import EventType, PeriodType, Reason
from subledger.core.sources import amazon
from subledger.core.sources.amazon import Failure, Fetched

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CONFIG = amazon.AmazonConfig(app_id="fit", package_name=PACKAGE)
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"
AWS = frozenset(amazon.AWS_SNS_HOSTS)
R = "koxIn_LO2u7rc-_MF40hKz1vqSSJSlitfTNDeH_JAs8=:3:11"


def rtn(kind: str, at: datetime = T0, **extra: Any) -> amazon.Rtn:
    return amazon.parse_notification(amazon.parse_envelope(sns_body(rtn_message(kind, R, at, **extra), CERT_URL)))


def mapped(kind: str, got: dict[str, Any] | None, *, at: datetime = T0, chain: Any = None,
           environment: str = "production", failure: Failure | None = None, **extra: Any) -> list[dict[str, Any]]:
    notification = amazon.map_notification(rtn(kind, at, **extra), Fetched(got, environment, failure), CONFIG,
                                           chain=chain)
    return [e.to_facts() for e in notification.events]


def kind_of(kind: str, got: dict[str, Any] | None, **extra: Any) -> str:
    return amazon.map_notification(rtn(kind, **extra), Fetched(got), CONFIG).kind


MONTH = T0 + timedelta(days=30)


# --- the mapping, one notification type at a time ----------------------------------------------


def test_a_purchase_is_a_purchase_of_the_term_sku_until_the_renewal_date() -> None:
    (fact,) = mapped("SUBSCRIPTION_PURCHASED", receipt(R, T0, renews=MONTH))
    assert (fact["type"], fact["product_id"], fact["period_type"], fact["expires_at"]) == (
        "purchase", "fit.monthly", "normal", "2026-03-31T12:00:00.000000Z")
    assert (fact["subscription_id"], fact["transaction_id"]) == (R, R)
    assert (fact["store"], fact["source"]) == ("amazon", "amazon")
    assert (fact["app_user_id"], fact["environment"], fact["country_code"]) == (USER, "production", "US")
    assert "price" not in fact  # RVS states no price
    stored = fact["attributes"]["amazon_fetched"]
    assert stored == {"environment": "production", "receipt": receipt(R, T0, renews=MONTH)}
    assert fact["attributes"]["amazon_parent_sku"] == "fit.premium"


def test_a_purchase_in_a_free_trial_is_a_trial_until_its_end() -> None:
    (fact,) = mapped("SUBSCRIPTION_PURCHASED", receipt(R, T0, renews=T0 + timedelta(days=7),
                                                       trial_end=T0 + timedelta(days=7)))
    assert (fact["period_type"], fact["expires_at"]) == ("trial", "2026-03-08T12:00:00.000000Z")


@pytest.mark.parametrize(("promotion", "phase"), [
    ({"promotionType": "Introductory Price - All Customers", "promotionStatus": "InProgress"}, "intro"),
    ({"promotionType": "Promotional Price - Lapsed Customers", "promotionStatus": "InProgress"}, "promotional"),
    ({"promotionType": "Introductory Price - All Customers", "promotionStatus": "Queued"}, "normal"),
])
def test_an_in_progress_promotion_sets_the_phase(promotion: dict[str, str], phase: str) -> None:
    (fact,) = mapped("SUBSCRIPTION_PURCHASED", receipt(R, T0, renews=MONTH, promotions=[promotion]))
    assert fact["period_type"] == phase


@pytest.mark.parametrize("kind", ["SUBSCRIPTION_RENEWED", "SUBSCRIPTION_CONVERTED_FREE_TRIAL_TO_PAID"])
def test_renewals_are_named_by_the_period_they_pay_for(kind: str) -> None:
    (fact,) = mapped(kind, receipt(R, T0 - timedelta(days=30), renews=MONTH), at=T0)
    assert (fact["type"], fact["period_type"]) == ("renewal", "normal")
    assert fact["expires_at"] == "2026-03-31T12:00:00.000000Z"
    assert fact["transaction_id"] == f"{R}:{int(MONTH.timestamp() * 1000)}"  # stable across redeliveries


@pytest.mark.parametrize("kind", ["SUBSCRIPTION_AUTO_RENEWAL_OFF", "SUBSCRIPTION_SCHEDULED_TO_END"])
def test_auto_renew_off_runs_to_the_cancel_date(kind: str) -> None:
    got = receipt(R, T0 - timedelta(days=10), renews=None, cancelled=MONTH, auto_renewing=False)
    (fact,) = mapped(kind, got)
    assert (fact["type"], fact["reason"], fact["expires_at"]) == ("auto_renew_disabled", "unsubscribe",
                                                                  "2026-03-31T12:00:00.000000Z")


def test_auto_renew_on() -> None:
    (fact,) = mapped("SUBSCRIPTION_AUTO_RENEWAL_ON", receipt(R, T0, renews=MONTH))
    assert (fact["type"], fact["expires_at"]) == ("auto_renew_enabled", "2026-03-31T12:00:00.000000Z")


def test_grace_period_is_a_billing_issue_with_access_until_the_grace_end() -> None:
    grace = T0 + timedelta(days=6)
    (fact,) = mapped("SUBSCRIPTION_IN_GRACE_PERIOD", receipt(R, T0 - timedelta(days=30), renews=T0, grace_end=grace))
    assert (fact["type"], fact["expires_at"]) == ("billing_issue", "2026-03-07T12:00:00.000000Z")
    assert fact["attributes"]["grace_period_ends_at"] == "2026-03-07T12:00:00.000000Z"


def test_out_of_grace_is_a_recovery_when_the_receipt_runs_on_and_an_expiration_when_cancelled() -> None:
    (recovered,) = mapped("SUBSCRIPTION_OUT_OF_GRACE_PERIOD", receipt(R, T0 - timedelta(days=33), renews=MONTH))
    assert recovered["type"] == "billing_recovered"
    assert recovered["transaction_id"] == f"{R}:{int(MONTH.timestamp() * 1000)}"
    lapsed = receipt(R, T0 - timedelta(days=36), cancelled=T0 - timedelta(minutes=1), cancel_reason=2,
                     auto_renewing=False)
    (expired,) = mapped("SUBSCRIPTION_OUT_OF_GRACE_PERIOD", lapsed)
    assert (expired["type"], expired["reason"]) == ("expiration", "billing_error")


@pytest.mark.parametrize(("reason", "expected"), [(1, "unsubscribe"), (2, "billing_error"), (0, "unknown"),
                                                  (None, "unknown")])
def test_expiration_reasons_follow_cancel_reason(reason: int | None, expected: str) -> None:
    got = receipt(R, T0 - timedelta(days=30), cancelled=T0, cancel_reason=reason, auto_renewing=False)
    (fact,) = mapped("SUBSCRIPTION_EXPIRED", got)
    assert (fact["type"], fact["reason"], fact["expires_at"]) == ("expiration", expected, "2026-03-01T12:00:00.000000Z")


def test_a_cancellation_by_the_customer_that_ends_access_now_is_a_refund_and_an_expiration() -> None:
    got = receipt(R, T0 - timedelta(days=3), cancelled=T0 - timedelta(seconds=5), cancel_reason=1,
                  auto_renewing=False)
    refund, expiration = mapped("SUBSCRIPTION_CANCELLED", got)
    assert (refund["type"], refund["transaction_id"], refund["product_id"]) == ("refund", R, "fit.monthly")
    assert "price" not in refund and refund["refund_id"].startswith(f"{R}:")
    assert (expiration["type"], expiration["reason"]) == ("expiration", "customer_support")


def test_a_cancellation_by_amazon_is_an_expiration_for_billing() -> None:
    got = receipt(R, T0 - timedelta(days=3), cancelled=T0, cancel_reason=2, auto_renewing=False)
    (fact,) = mapped("SUBSCRIPTION_CANCELLED", got)
    assert (fact["type"], fact["reason"]) == ("expiration", "billing_error")


def test_a_cancellation_dated_later_only_turns_auto_renew_off() -> None:
    got = receipt(R, T0 - timedelta(days=3), cancelled=MONTH, cancel_reason=1, auto_renewing=False)
    (fact,) = mapped("SUBSCRIPTION_CANCELLED", got)
    assert (fact["type"], fact["reason"], fact["expires_at"]) == ("auto_renew_disabled", "unsubscribe",
                                                                  "2026-03-31T12:00:00.000000Z")


@pytest.mark.parametrize("kind", ["SUBSCRIPTION_CANCELLED", "SUBSCRIPTION_EXPIRED"])
def test_the_receipt_a_tier_change_replaced_is_stored_only(kind: str) -> None:
    got = receipt(R, T0 - timedelta(days=3), cancelled=T0, cancel_reason=4, auto_renewing=False)
    assert mapped(kind, got) == []
    assert kind_of(kind, got) == f"{kind}/REPLACED"


def test_a_cancellation_rvs_still_holds_valid_is_stored_only() -> None:
    assert kind_of("SUBSCRIPTION_CANCELLED", receipt(R, T0, renews=MONTH)) == "SUBSCRIPTION_CANCELLED/NOT_CANCELLED"


def test_an_immediate_tier_change_joins_the_replaced_receipts_chain() -> None:
    new = "R4TWNm8Uspo4Ujio51B5_7xBnRFzr4B2k9Bv48_7mRY=:3:11"
    message = rtn_message("SUBSCRIPTION_MODIFIED_IMMEDIATE", new, T0, cancelled=R)
    parsed = amazon.parse_notification(amazon.parse_envelope(sns_body(message, CERT_URL)))
    got = receipt(new, T0, renews=T0 + timedelta(days=365), term_sku="fit.annual")
    notification = amazon.map_notification(parsed, Fetched(got), CONFIG, chain={R: "first-receipt"}.get)
    change, charge = (e.to_facts() for e in notification.events)
    assert (change["type"], change["new_product_id"], change["subscription_id"]) == (
        "product_change", "fit.annual", "first-receipt")
    assert (charge["type"], charge["product_id"], charge["transaction_id"]) == ("renewal", "fit.annual", new)
    assert change["attributes"]["amazon_cancelled_receipt_id"] == R
    # without the log's answer the replaced receipt itself is the chain's root
    alone = amazon.map_notification(parsed, Fetched(got), CONFIG)
    assert {e.subscription_id for e in alone.events} == {R}


def test_a_deferred_tier_change_is_a_product_change_effective_later() -> None:
    when = MONTH
    got = receipt(R, T0 - timedelta(days=3), renews=when, deferredSku="fit.annual", deferredDate=ms(when))
    (fact,) = mapped("SUBSCRIPTION_MODIFIED_DEFERRED", got)
    assert (fact["type"], fact["product_id"], fact["new_product_id"]) == ("product_change", "fit.monthly", "fit.annual")
    assert fact["attributes"]["effective_at"] == "2026-03-31T12:00:00.000000Z"


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


@pytest.mark.parametrize("kind", ["CONSUMABLE_PURCHASED", "ENTITLEMENT_PURCHASED"])
def test_one_time_purchases(kind: str) -> None:
    got = receipt(R, T0, term_sku=None, parent="gems.100", product_type="CONSUMABLE", autoRenewing=None)
    del got["termSku"]
    (fact,) = mapped(kind, got)
    assert (fact["type"], fact["product_id"], fact["transaction_id"]) == ("one_time_purchase", "gems.100", R)
    assert "subscription_id" not in fact


@pytest.mark.parametrize("kind", ["CONSUMABLE_CANCELLED", "ENTITLEMENT_CANCELLED", "SOMETHING_NEW"])
def test_cancelled_one_time_purchases_and_unknown_types_are_stored_only(kind: str) -> None:
    got = receipt(R, T0, parent="gems.100", product_type="CONSUMABLE", cancelled=T0, cancel_reason=1)
    assert mapped(kind, got) == []
    assert kind_of(kind, got) == kind


@pytest.mark.parametrize(("status", "suffix"), [(400, "NOT_FOUND"), (497, "UNKNOWN_USER"), (410, "GONE")])
def test_rvs_refusals_are_stored_only_with_the_reason(status: int, suffix: str) -> None:
    notification = amazon.map_notification(rtn("SUBSCRIPTION_RENEWED"), Fetched(failure=Failure(status, "x")), CONFIG)
    assert (notification.kind, notification.events) == (f"SUBSCRIPTION_RENEWED/{suffix}", ())
    assert notification.subscription_key == f"fit/amazon/{R}"


def test_a_receipt_rvs_calls_no_longer_valid_on_a_cancellation_ends_it() -> None:
    (fact,) = mapped("SUBSCRIPTION_CANCELLED", None, failure=Failure(410, "gone"))
    assert (fact["type"], fact["reason"]) == ("expiration", "unknown")


@pytest.mark.parametrize(("extra", "environment"), [
    ({}, "production"), ({"testTransaction": True}, "sandbox"), ({"betaProduct": True}, "sandbox")])
def test_test_receipts_are_sandbox(extra: dict[str, Any], environment: str) -> None:
    (fact,) = mapped("SUBSCRIPTION_PURCHASED", receipt(R, T0, renews=MONTH, **extra))
    assert fact["environment"] == environment
    (found_in_sandbox,) = mapped("SUBSCRIPTION_PURCHASED", receipt(R, T0, renews=MONTH), environment="sandbox")
    (live_app_test,) = mapped("SUBSCRIPTION_PURCHASED", receipt(R, T0, renews=MONTH), beta=True)
    assert found_in_sandbox["environment"] == live_app_test["environment"] == "sandbox"


def test_impossible_receipts_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidEvent) as raised:
        mapped("SUBSCRIPTION_PURCHASED", receipt(R, T0, renews=None, renewalDate=2**63))
    assert raised.value.field == "rvs.receipt.renewalDate"
    with pytest.raises(InvalidEvent) as raised:
        mapped("SUBSCRIPTION_PURCHASED", receipt("another-receipt", T0, renews=MONTH))
    assert raised.value.field == "rvs.receipt.receiptId"
    with pytest.raises(InvalidEvent) as raised:
        mapped("SUBSCRIPTION_PURCHASED", None)
    assert raised.value.field == "rvs.receipt"
    with pytest.raises(InvalidEvent):
        amazon.map_notification(rtn("SUBSCRIPTION_PURCHASED", package="com.other"), Fetched({}), CONFIG)


def test_the_idempotency_key_is_the_notification_not_the_sns_message() -> None:
    message = rtn_message("SUBSCRIPTION_RENEWED", R, T0)
    one = amazon.parse_notification(amazon.parse_envelope(sns_body(message, CERT_URL, message_id="m-1")))
    two = amazon.parse_notification(amazon.parse_envelope(sns_body(message, CERT_URL, message_id="m-2")))
    later = amazon.parse_notification(amazon.parse_envelope(sns_body(
        rtn_message("SUBSCRIPTION_RENEWED", R, T0 + timedelta(days=30)), CERT_URL, message_id="m-1")))
    assert one.external_id == two.external_id != later.external_id
    assert one.external_id.startswith("rtn:") and len(one.external_id) == 52


def test_fetched_round_trips_through_its_stored_form() -> None:
    got = Fetched(receipt(R, T0, renews=MONTH), "sandbox")
    assert Fetched.from_json(got.to_json()) == got
    failed = Fetched(failure=Failure(410, "gone"))
    assert Fetched.from_json(failed.to_json()) == failed
    for bad in ([], {"receipt": []}, {"environment": "moon", "receipt": {}}, {"failure": {"status": "x"}}, {}):
        with pytest.raises(MalformedPayload):
            Fetched.from_json(bad)


# --- the envelope and the message --------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    (b"[]", "body"), (b"{}", "Type"), (json.dumps({"Type": "Notification"}).encode(), "MessageId"),
    (json.dumps({"Type": "SubscriptionConfirmation", "MessageId": "m", "TopicArn": "t", "Message": "m",
                 "Timestamp": "t", "SignatureVersion": "1", "Signature": "s", "SigningCertURL": "u"}).encode(),
     "SubscribeURL"),
])
def test_malformed_envelopes_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(MalformedPayload) as raised:
        amazon.parse_envelope(body)
    assert raised.value.field == field


@pytest.mark.parametrize(("message", "field"), [
    ("not json", "Message"), ("[]", "Message"),
    ({"notificationType": "SUBSCRIPTION_RENEWED"}, "Message.appPackageName"),
    ({**rtn_message("SUBSCRIPTION_RENEWED", R, T0), "notificationType": "lower case"}, "Message.notificationType"),
    ({**rtn_message("SUBSCRIPTION_RENEWED", R, T0), "receiptId": ""}, "Message.receiptId"),
    ({**rtn_message("SUBSCRIPTION_RENEWED", R, T0), "receiptId": "r" * 201}, "Message.receiptId"),
    ({**rtn_message("SUBSCRIPTION_RENEWED", R, T0), "appUserId": None}, "Message.appUserId"),
    ({**rtn_message("SUBSCRIPTION_RENEWED", R, T0), "timestamp": 2**63}, "Message.timestamp"),
    ({**rtn_message("SUBSCRIPTION_RENEWED", R, T0), "relatedReceipts": []}, "Message.relatedReceipts"),
])
def test_malformed_messages_name_the_field(message: Any, field: str) -> None:
    with pytest.raises((MalformedPayload, InvalidEvent)) as raised:
        amazon.parse_notification(amazon.parse_envelope(sns_body(message, CERT_URL)))
    assert raised.value.field == field


# --- signatures --------------------------------------------------------------------------------


NOW = datetime.now(UTC)


def envelope(**kwargs: Any) -> amazon.Envelope:
    return amazon.parse_envelope(sns_body(rtn_message("SUBSCRIPTION_RENEWED", R, T0), CERT_URL, **kwargs))


@pytest.mark.parametrize("version", ["1", "2"])
def test_both_signature_versions_verify(version: str) -> None:
    amazon.verify_signature(envelope(version=version), GOOD.pem, NOW)


@pytest.mark.parametrize(("case", "field"), [
    ("tampered", "Signature"), ("other key", "Signature"), ("expired", "SigningCertURL"),
    ("version 3", "SignatureVersion"), ("not yet valid", "SigningCertURL"), ("not pem", "SigningCertURL"),
    ("sha1 signature, version 2", "Signature"),
])
def test_signature_refusals(case: str, field: str) -> None:
    cert, when, env = GOOD.pem, NOW, envelope()
    if case == "tampered":
        env = envelope(tamper=True)
    elif case == "other key":
        cert = OTHER.pem
    elif case == "expired":
        env, cert = envelope(signer=EXPIRED), EXPIRED.pem
    elif case == "version 3":
        env = envelope(version="3")
    elif case == "not yet valid":
        when = NOW - timedelta(days=5)
    elif case == "not pem":
        cert = b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    else:
        env = amazon.Envelope({**envelope().fields, "SignatureVersion": "2"})
    with pytest.raises(BadSignature) as raised:
        amazon.verify_signature(env, cert, when)
    assert raised.value.field == field


def test_a_confirmation_signs_its_subscribe_url_and_token() -> None:
    from fake_amazon import confirmation_body

    env = amazon.parse_envelope(confirmation_body(CERT_URL, "https://sns.us-east-1.amazonaws.com/"))
    signed = amazon.string_to_sign(env).decode()
    assert "SubscribeURL\nhttps://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription" in signed
    assert f"Token\n{env.get('Token')}\n" in signed
    amazon.verify_signature(env, GOOD.pem, NOW)
    changed = amazon.Envelope({**env.fields, "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?evil"})
    with pytest.raises(BadSignature):
        amazon.verify_signature(changed, GOOD.pem, NOW)


@pytest.mark.parametrize("url", [
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-a86cb10b.pem",
    "https://sns.ap-southeast-2.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem",
    "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-x.pem",
])
def test_sns_certificate_urls_are_accepted(url: str) -> None:
    amazon.check_sns_url(url, AWS, "SigningCertURL", pem=True)


@pytest.mark.parametrize("url", [
    "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem",  # not https
    "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-x.pem",
    "https://evil.example/sns.us-east-1.amazonaws.com/x.pem",
    "https://s3.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.us-east-1.amazonaws.com@evil.example/x.pem",
    "https://user@sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com:8443/x.pem",
    "https://sns.us-east-1.amazonaws.com/x.txt",  # not a certificate
    "https://127.0.0.1:9000/x.pem",  # loopback is accepted only when configured
    "not a url", "https://[::1/x.pem",
])
def test_other_certificate_urls_are_refused(url: str) -> None:
    with pytest.raises(BadSignature) as raised:
        amazon.check_sns_url(url, AWS, "SigningCertURL", pem=True)
    assert raised.value.field == "SigningCertURL"


def test_a_configured_loopback_host_is_accepted_and_then_aws_needs_its_pattern() -> None:
    hosts = frozenset({"127.0.0.1:9000"})
    amazon.check_sns_url("http://127.0.0.1:9000/x.pem", hosts, "SigningCertURL", pem=True)
    with pytest.raises(BadSignature):
        amazon.check_sns_url("http://127.0.0.1:9001/x.pem", hosts, "SigningCertURL", pem=True)
    with pytest.raises(BadSignature):
        amazon.check_sns_url("https://sns.us-east-1.amazonaws.com/x.pem", hosts, "SigningCertURL", pem=True)


@pytest.mark.parametrize(("entry", "allowed"), [
    ("sns.*.amazonaws.com", True), ("sns.*.amazonaws.com.cn", True), ("127.0.0.1:8080", True),
    ("localhost:1", True), ("[::1]:443", True), ("evil.example", False), ("evil.example:443", False),
    ("*.amazonaws.com", False), ("127.0.0.1", False), ("127.0.0.1:0", False), ("10.0.0.1:80", False),
])
def test_only_sns_patterns_or_loopback_can_be_configured(entry: str, allowed: bool) -> None:
    assert amazon.allowed_host(entry) is allowed


def test_config_needs_an_app_and_a_package() -> None:
    with pytest.raises(ConfigError):
        amazon.AmazonConfig(app_id="", package_name="p")
    with pytest.raises(ConfigError):
        amazon.AmazonConfig(app_id="a", package_name="")


def test_every_mapped_type_states_its_facts() -> None:
    """Each notification type the README's table names maps as documented (a guard for the table)."""
    got = receipt(R, T0 - timedelta(days=30), renews=MONTH, grace_end=T0 + timedelta(days=3))
    table = {
        "SUBSCRIPTION_PURCHASED": [EventType.PURCHASE], "SUBSCRIPTION_RENEWED": [EventType.RENEWAL],
        "SUBSCRIPTION_CONVERTED_FREE_TRIAL_TO_PAID": [EventType.RENEWAL],
        "SUBSCRIPTION_AUTO_RENEWAL_OFF": [EventType.AUTO_RENEW_DISABLED],
        "SUBSCRIPTION_SCHEDULED_TO_END": [EventType.AUTO_RENEW_DISABLED],
        "SUBSCRIPTION_AUTO_RENEWAL_ON": [EventType.AUTO_RENEW_ENABLED],
        "SUBSCRIPTION_IN_GRACE_PERIOD": [EventType.BILLING_ISSUE],
        "SUBSCRIPTION_OUT_OF_GRACE_PERIOD": [EventType.BILLING_RECOVERED],
        "SUBSCRIPTION_EXPIRED": [EventType.EXPIRATION],
    }
    for kind, types in table.items():
        assert [f["type"] for f in mapped(kind, got)] == [t.value for t in types], kind
    assert PeriodType.TRIAL.value == "trial" and Reason.UNSUBSCRIBE.value == "unsubscribe"
