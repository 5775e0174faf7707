"""Amazon Appstore Real-time Notifications (RTN) → canonical events.

Why this module looks the way it does:

* An RTN delivery is an Amazon SNS message (`Type`, `MessageId`, `TopicArn`, `Message`, `Timestamp`,
  `SignatureVersion`, `Signature`, `SigningCertURL`, ...) whose `Message` is Amazon's escaped JSON
  (`appPackageName`, `notificationType`, `appUserId`, `receiptId`, `relatedReceipts`, `timestamp`,
  `betaProductTransaction`). Amazon subscribes the endpoint with a signed `SubscriptionConfirmation`.
* The signature is checked here, purely: the canonical string-to-sign of SNS, RSA PKCS#1 v1.5 with
  SHA-1 (`SignatureVersion` 1) or SHA-256 (2), against a certificate the caller fetched from a
  `SigningCertURL` this module accepted first (https on `sns.<region>.amazonaws.com`; loopback
  hosts only when configured, for tests), within its validity period at the caller's `now`.
  No Python library for SNS verification is kept up for Python 3.11 with both versions (README,
  "Amazon Appstore"), so it is `cryptography`, as for Apple's certificates.
* The notification carries no state: the caller looks the receipt up in the Receipt Verification
  Service (RVS) and passes what it got as `Fetched`; the fetched receipt is kept in the first fact's
  attributes (`amazon_fetched`) beside the SNS body stored verbatim, so replay never calls Amazon.
* The idempotency key is a digest of what the notification states (package, type, receipt,
  timestamp), not the SNS `MessageId`: an SNS redelivery and a second publication of the same
  notification by Amazon (its documentation warns of duplicates) are both one entry.
* One receipt id spans a subscription's renewals; an immediate tier change issues a new receipt
  naming the cancelled one (`relatedReceipts.cancelledReceiptId`). `subscription_id` is the chain's
  first receipt: the caller injects `ChainLookup` (receipt id → subscription id already logged).
* RVS states no price: facts carry none (README, "Mapping decisions").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from subledger.core import events, safejson
from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, MalformedPayload
from subledger.core.events import EventType, PeriodType, Reason, Source, Store, format_time
from subledger.core.sources import Notification
from subledger.core.sources.payload import (
    as_dict,
    as_int,
    as_list,
    as_str,
    country_code,
    fact_id,
    fact_value,
    unix_time,
)

MAX_RECEIPT = 200  # Amazon: a receipt id is at most 200 characters
MAX_USER = 500
CONFIRMATIONS = frozenset({"SubscriptionConfirmation", "UnsubscribeConfirmation"})
# The fields SNS signs, in its order; a notification's Subject only when present.
NOTIFICATION_SIGNED = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_SIGNED = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
SIGNATURE_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
# SNS's own hosts: sns.<region>.amazonaws.com (and .com.cn in China). The only pattern in production.
AWS_SNS_HOSTS = ("sns.*.amazonaws.com", "sns.*.amazonaws.com.cn")
_AWS_HOST = re.compile(r"sns\.[a-z]{2}(?:-[a-z]+)+-\d\.amazonaws\.com(?:\.cn)?")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")

SUBSCRIPTION_TYPES = frozenset({
    "SUBSCRIPTION_PURCHASED", "SUBSCRIPTION_RENEWED", "SUBSCRIPTION_CONVERTED_FREE_TRIAL_TO_PAID",
    "SUBSCRIPTION_AUTO_RENEWAL_OFF", "SUBSCRIPTION_AUTO_RENEWAL_ON", "SUBSCRIPTION_SCHEDULED_TO_END",
    "SUBSCRIPTION_IN_GRACE_PERIOD", "SUBSCRIPTION_OUT_OF_GRACE_PERIOD", "SUBSCRIPTION_CANCELLED",
    "SUBSCRIPTION_EXPIRED", "SUBSCRIPTION_MODIFIED_IMMEDIATE", "SUBSCRIPTION_MODIFIED_DEFERRED",
})
ONE_TIME_TYPES = frozenset({"CONSUMABLE_PURCHASED", "ENTITLEMENT_PURCHASED",
                            "CONSUMABLE_CANCELLED", "ENTITLEMENT_CANCELLED"})
# RVS `cancelReason`: 1 the customer cancelled the order, 2 Amazon's system did (payment not fixed
# within the grace period, or customer support), 4 replaced by a tier/term change; 0 not known yet.
CANCEL_REASON = {1: Reason.UNSUBSCRIBE, 2: Reason.BILLING_ERROR}
REPLACED = 4
FAILURE_SUFFIX = {400: "NOT_FOUND", 497: "UNKNOWN_USER", 410: "GONE"}
_TYPE = re.compile(r"[A-Z0-9_]{1,100}")

ChainLookup = Callable[[str], str | None]
Family = Literal["subscription", "one_time", "other"]


@dataclass(frozen=True, slots=True)
class AmazonConfig:
    """One app's Amazon settings: `package_name` routes notifications, `app_id` names the app."""

    app_id: str
    package_name: str

    def __post_init__(self) -> None:
        if not self.app_id:
            raise ConfigError("amazon.app_id", "must not be empty")
        if not self.package_name:
            raise ConfigError("amazon.package_name", "must not be empty")


# --- the SNS envelope and its signature --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """An SNS message as posted: its fields as strings (SNS writes every value as one)."""

    fields: Mapping[str, str]

    @property
    def type(self) -> str:
        return self.fields["Type"]

    @property
    def message(self) -> str:
        return self.fields["Message"]

    @property
    def topic_arn(self) -> str:
        return self.fields["TopicArn"]

    @property
    def signing_cert_url(self) -> str:
        return self.fields["SigningCertURL"]

    @property
    def signature_version(self) -> str:
        return self.fields["SignatureVersion"]

    def get(self, name: str) -> str | None:
        return self.fields.get(name)


def parse_envelope(raw: bytes) -> Envelope:
    """An SNS body → Envelope; MalformedPayload names the first missing or mistyped field."""
    obj = safejson.loads(raw, what="body")
    if not isinstance(obj, dict):
        raise MalformedPayload("must be a JSON object (an Amazon SNS message)", "body")
    kind = obj.get("Type")
    if not isinstance(kind, str) or not kind:
        raise MalformedPayload("is required (not an Amazon SNS message)", "Type")
    required = ["Type", "MessageId", "TopicArn", "Message", "Timestamp", "SignatureVersion", "Signature",
                "SigningCertURL"]
    if kind in CONFIRMATIONS:
        required += ["SubscribeURL", "Token"]
    fields: dict[str, str] = {}
    for name in required:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            raise MalformedPayload("is required and must be a string", name)
        fields[name] = value
    for name in ("Subject", "UnsubscribeURL"):
        value = obj.get(name)
        if isinstance(value, str):
            fields[name] = value
        elif value is not None:
            raise MalformedPayload("must be a string", name)
    if len(fields["MessageId"]) > 200:
        raise MalformedPayload("longer than 200 characters", "MessageId")
    return Envelope(fields)


def string_to_sign(envelope: Envelope) -> bytes:
    """SNS's canonical form: `name\\nvalue\\n` for each signed field present, in SNS's order."""
    names = CONFIRMATION_SIGNED if envelope.type in CONFIRMATIONS else NOTIFICATION_SIGNED
    return "".join(f"{n}\n{envelope.fields[n]}\n" for n in names if n in envelope.fields).encode()


def signature_hash(version: str) -> hashes.HashAlgorithm:
    """SignatureVersion 1 is SHA1withRSA, 2 is SHA256withRSA; any other version is refused."""
    algorithm = SIGNATURE_HASHES.get(version)
    if algorithm is None:
        raise BadSignature(f"SignatureVersion {version[:20]!r} is not supported (1 or 2)", "SignatureVersion")
    return algorithm()


def allowed_host(entry: str) -> bool:
    """Whether `entry` may be configured in `sns_certificate_hosts`: SNS's own pattern, or a loopback
    `host:port` (a fake in tests). Nothing else can be added, so no setting widens production."""
    if entry in AWS_SNS_HOSTS:
        return True
    host, _, port = entry.rpartition(":")
    return host in LOOPBACK and port.isdigit() and 0 < int(port) < 65536


def check_sns_url(url: str, hosts: frozenset[str], field: str, *, pem: bool = False) -> None:
    """Refuse a URL SNS would not send: https on `sns.<region>.amazonaws.com` (the AWS patterns
    in `hosts`), or a configured loopback `host:port` (http allowed there: it is a test fake)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadSignature("is not a URL", field) from None
    host = (parts.hostname or "").lower()
    if parts.username is not None or parts.password is not None or not host:
        raise BadSignature("must be an SNS URL without credentials", field)
    aws = any(h in AWS_SNS_HOSTS for h in hosts) and _AWS_HOST.fullmatch(host) is not None
    ok = parts.scheme == "https" and aws and port in (None, 443)
    if not ok and parts.scheme in ("http", "https") and parts.netloc.lower() in hosts:
        ok = parts.netloc.lower().rpartition(":")[0] in LOOPBACK
    if not ok:
        raise BadSignature(f"{host[:100]!r} is not an Amazon SNS host (https://sns.<region>.amazonaws.com)", field)
    if pem and not parts.path.endswith(".pem"):
        raise BadSignature("must name a .pem certificate", field)


def verify_signature(envelope: Envelope, certificate: bytes, now: datetime) -> None:
    """Raise BadSignature unless `certificate` (PEM), valid at `now`, signed `envelope`."""
    algorithm = signature_hash(envelope.signature_version)
    try:
        cert = x509.load_pem_x509_certificate(certificate)
    except ValueError:
        raise BadSignature("the signing certificate is not a PEM certificate", "SigningCertURL") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise BadSignature(f"the signing certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
                           f"to {cert.not_valid_after_utc:%Y-%m-%d})", "SigningCertURL")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadSignature("the signing certificate's key is not RSA", "SigningCertURL")
    try:
        signature = base64.b64decode(envelope.fields["Signature"].encode("ascii"), validate=True)
    except (ValueError, binascii.Error):
        raise BadSignature("is not base64", "Signature") from None
    try:
        key.verify(signature, string_to_sign(envelope), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise BadSignature("does not verify against the signing certificate", "Signature") from None


# --- the RTN message ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rtn:
    """A parsed notification, before its receipt is fetched."""

    external_id: str
    package_name: str
    notification_type: str
    family: Family
    app_user_id: str
    receipt_id: str
    event_time: datetime
    cancelled_receipt_id: str | None = None
    beta: bool = False
    topic_arn: str | None = None


def parse_notification(envelope: Envelope) -> Rtn:
    """The `Message` of a `Notification` → Rtn; MalformedPayload / InvalidEvent name the field."""
    if envelope.type != "Notification":
        raise MalformedPayload(f"{envelope.type[:60]!r} is not an RTN Notification", "Type")
    obj = safejson.loads(envelope.message.encode("utf-8", "surrogatepass"), what="Message")
    if not isinstance(obj, dict):
        raise MalformedPayload("must be JSON text of an object (an RTN message)", "Message")
    package = obj.get("appPackageName")
    if not isinstance(package, str) or not package.strip():
        raise MalformedPayload("is required (not an RTN message)", "Message.appPackageName")
    if len(package) > 200:
        raise InvalidEvent("longer than 200 characters", "Message.appPackageName")
    kind = obj.get("notificationType")
    if not isinstance(kind, str) or _TYPE.fullmatch(kind) is None:
        raise InvalidEvent("must be an RTN notification type (A-Z, 0-9, _)", "Message.notificationType")
    receipt = _id(obj.get("receiptId"), "Message.receiptId", MAX_RECEIPT)
    user = _id(obj.get("appUserId"), "Message.appUserId", MAX_USER)
    when = unix_time(obj.get("timestamp"), "Message.timestamp")
    related = obj.get("relatedReceipts")
    if related is not None and not isinstance(related, dict):
        raise MalformedPayload("must be an object", "Message.relatedReceipts")
    cancelled_value = as_dict(related).get("cancelledReceiptId")
    cancelled = None if cancelled_value is None else _id(cancelled_value, "Message.relatedReceipts.cancelledReceiptId",
                                                            MAX_RECEIPT)
    beta = obj.get("betaProductTransaction") is True
    digest = hashlib.sha256("\n".join((package, kind, receipt, str(obj["timestamp"]))).encode()).hexdigest()
    family: Family = ("subscription" if kind in SUBSCRIPTION_TYPES else
                      "one_time" if kind in ONE_TIME_TYPES else "other")
    return Rtn(external_id=f"rtn:{digest[:48]}", package_name=package, notification_type=kind, family=family,
               app_user_id=user, receipt_id=receipt, event_time=when, cancelled_receipt_id=cancelled, beta=beta,
               topic_arn=envelope.topic_arn[:500])


def unverified_package(raw: bytes) -> str | None:
    """The package a body claims, for routing before its signature is checked (None: unreadable)."""
    try:
        return parse_notification(parse_envelope(raw)).package_name
    except (MalformedPayload, InvalidEvent):
        return None


# --- what was fetched --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """An RVS answer that is final for this receipt (400 unknown, 410 no longer valid, 497 user)."""

    status: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Fetched:
    """What RVS answered for one notification: the receipt JSON, in the environment that knew it."""

    receipt: Mapping[str, Any] | None = None
    environment: str = "production"
    failure: Failure | None = None

    def to_json(self) -> dict[str, Any]:
        """The form kept in the log (`amazon_fetched`) and accepted back by `from_json`."""
        out: dict[str, Any] = {"environment": self.environment}
        if self.receipt is not None:
            out["receipt"] = dict(self.receipt)
        if self.failure is not None:
            out["failure"] = self.failure.to_json()
        return out

    @classmethod
    def from_json(cls, value: Any) -> Fetched:
        """A stored `amazon_fetched` object (a captured line) → Fetched; strict about shapes."""
        if not isinstance(value, dict):
            raise MalformedPayload("must be an object", "subledger_fetched")
        receipt = value.get("receipt")
        if receipt is not None and not isinstance(receipt, dict):
            raise MalformedPayload("must be an object", "subledger_fetched.receipt")
        environment = value.get("environment", "production")
        if environment not in ("production", "sandbox"):
            raise MalformedPayload("must be production or sandbox", "subledger_fetched.environment")
        failure = value.get("failure")
        parsed = None
        if failure is not None:
            status = as_int(as_dict(failure).get("status"))
            if status is None:
                raise MalformedPayload("must be {status, reason}", "subledger_fetched.failure")
            parsed = Failure(status, as_str(as_dict(failure).get("reason")) or "")
        if receipt is None and parsed is None:
            raise MalformedPayload("needs a receipt or a failure", "subledger_fetched")
        return cls(receipt=receipt, environment=str(environment), failure=parsed)


# --- mapping -----------------------------------------------------------------------------------


def stream_key(app_id: str, subscription_id: str) -> str:
    """The subscription key an Amazon subscription's events get (for stored-only notifications)."""
    return events.stream_key(app_id, Store.AMAZON, subscription_id)


def map_notification(rtn: Rtn, fetched: Fetched, config: AmazonConfig, *,
                     chain: ChainLookup | None = None) -> Notification:
    """A notification and the receipt RVS answered for it → a Notification (facts, or stored only)."""
    if rtn.package_name != config.package_name:
        raise InvalidEvent(f"{rtn.package_name!r} is not {config.package_name!r}", "Message.appPackageName")
    return _Mapping(rtn, fetched, config, chain).notification()


class _Mapping:
    """The mapping of one notification; one method per notification type."""

    def __init__(self, rtn: Rtn, fetched: Fetched, config: AmazonConfig, chain: ChainLookup | None) -> None:
        self.rtn = rtn
        self.fetched = fetched
        self.config = config
        self.chain = chain
        self.receipt: dict[str, Any] = as_dict(fetched.receipt)
        self.kind = rtn.notification_type
        self.subscription_id: str | None = None
        self.facts: list[dict[str, Any]] = []

    def notification(self) -> Notification:
        rtn = self.rtn
        if self.fetched.failure is not None:
            self.on_failure(self.fetched.failure)
        elif rtn.family == "subscription":
            self._require_receipt()
            self.subscription_id = self._root(rtn.cancelled_receipt_id or rtn.receipt_id)
            handler = self.HANDLERS.get(rtn.notification_type)
            if handler is not None:
                handler(self)
        elif rtn.family == "one_time":
            self._require_receipt()
            if rtn.notification_type.endswith("_PURCHASED"):
                self.on_one_time()
            # a cancelled (refunded) one-time purchase has no subscription stream to state it on: stored only
        stored = stream_key(self.config.app_id, self.subscription_id) if self.subscription_id else None
        return Notification.from_facts(Source.AMAZON, rtn.external_id, self.config.app_id, self.kind[:200],
                                       self.facts, stored_key=stored)

    def on_failure(self, failure: Failure) -> None:
        self.kind = f"{self.rtn.notification_type}/{FAILURE_SUFFIX.get(failure.status, f'HTTP_{failure.status}')}"
        if self.rtn.family != "subscription":
            return
        self.subscription_id = self._root(self.rtn.receipt_id)
        if failure.status == 410 and self.rtn.notification_type in ("SUBSCRIPTION_CANCELLED", "SUBSCRIPTION_EXPIRED"):
            # RVS: "no longer valid; treat it as a cancelled receipt" — the access has ended
            self._add(EventType.EXPIRATION, reason=Reason.UNKNOWN)

    # -- subscription notifications --

    def on_purchased(self) -> None:
        trial_end = self._time("freeTrialEndDate")
        phase = PeriodType.TRIAL if trial_end is not None and trial_end > self.rtn.event_time else self._promotion()
        expires = trial_end if phase is PeriodType.TRIAL else self._period_end()
        self._add(EventType.PURCHASE, product_id=self._product(), period_type=phase, expires_at=expires,
                  transaction_id=self.rtn.receipt_id)

    def on_renewed(self) -> None:
        self._charge(EventType.RENEWAL)

    def on_auto_renew_off(self) -> None:
        self._add(EventType.AUTO_RENEW_DISABLED, reason=Reason.UNSUBSCRIBE,
                  expires_at=self._time("cancelDate") or self._time("renewalDate"))

    def on_auto_renew_on(self) -> None:
        self._add(EventType.AUTO_RENEW_ENABLED, expires_at=self._period_end())

    def on_grace(self) -> None:
        grace_end = self._time("gracePeriodEndDate")
        self._add(EventType.BILLING_ISSUE, expires_at=grace_end,
                  attributes={"grace_period_ends_at": None if grace_end is None else format_time(grace_end)})

    def on_out_of_grace(self) -> None:
        cancelled = self._time("cancelDate")
        if cancelled is not None and cancelled <= self.rtn.event_time:
            self._add(EventType.EXPIRATION, reason=Reason.BILLING_ERROR, expires_at=cancelled)
        else:
            self._charge(EventType.BILLING_RECOVERED)

    def on_expired(self) -> None:
        reason = self._cancel_reason()
        if reason == REPLACED:
            self.kind = f"{self.rtn.notification_type}/REPLACED"
            return  # the old receipt of an immediate tier change: part of a product change, not churn
        self._add(EventType.EXPIRATION, reason=CANCEL_REASON.get(reason or 0, Reason.UNKNOWN),
                  expires_at=self._time("cancelDate"))

    def on_cancelled(self) -> None:
        reason = self._cancel_reason()
        cancelled = self._time("cancelDate")
        if reason == REPLACED:
            self.kind = f"{self.rtn.notification_type}/REPLACED"
            return
        if cancelled is None:
            self.kind = f"{self.rtn.notification_type}/NOT_CANCELLED"
            return  # RVS still holds the receipt valid: nothing to state
        if cancelled > self.rtn.event_time:
            # access runs to the cancel date: auto-renew is off, the subscription has not ended
            self._add(EventType.AUTO_RENEW_DISABLED, reason=CANCEL_REASON.get(reason or 0, Reason.UNKNOWN),
                      expires_at=cancelled)
            return
        if reason == 1:
            # the customer cancelled the order and the access ended now: Amazon refunded it
            self._add(EventType.REFUND, product_id=self._product(), transaction_id=self.rtn.receipt_id,
                      refund_id=f"{self.rtn.receipt_id}:{_ms(cancelled)}")
            self._add(EventType.EXPIRATION, reason=Reason.CUSTOMER_SUPPORT, expires_at=cancelled)
            return
        self._add(EventType.EXPIRATION, reason=CANCEL_REASON.get(reason or 0, Reason.UNKNOWN), expires_at=cancelled)

    def on_modified_immediate(self) -> None:
        # the old receipt is cancelled and the new plan starts now, charged: the change sorts first
        self._add(EventType.PRODUCT_CHANGE, new_product_id=self._product(), expires_at=self._period_end(),
                  attributes={"amazon_cancelled_receipt_id": self.rtn.cancelled_receipt_id})
        self._add(EventType.RENEWAL, product_id=self._product(), period_type=self._promotion(),
                  expires_at=self._period_end(), transaction_id=self.rtn.receipt_id)

    def on_modified_deferred(self) -> None:
        deferred = as_str(self.receipt.get("deferredSku"))
        if deferred is None:
            self.kind = f"{self.rtn.notification_type}/NO_DEFERRED_SKU"
            return
        when = self._time("deferredDate")
        self._add(EventType.PRODUCT_CHANGE, product_id=self._product(), new_product_id=deferred,
                  expires_at=self._period_end(),
                  attributes={"effective_at": None if when is None else format_time(when)})

    HANDLERS: dict[str, Callable[[_Mapping], None]] = {
        "SUBSCRIPTION_PURCHASED": on_purchased,
        "SUBSCRIPTION_RENEWED": on_renewed,
        "SUBSCRIPTION_CONVERTED_FREE_TRIAL_TO_PAID": on_renewed,
        "SUBSCRIPTION_AUTO_RENEWAL_OFF": on_auto_renew_off,
        "SUBSCRIPTION_SCHEDULED_TO_END": on_auto_renew_off,
        "SUBSCRIPTION_AUTO_RENEWAL_ON": on_auto_renew_on,
        "SUBSCRIPTION_IN_GRACE_PERIOD": on_grace,
        "SUBSCRIPTION_OUT_OF_GRACE_PERIOD": on_out_of_grace,
        "SUBSCRIPTION_EXPIRED": on_expired,
        "SUBSCRIPTION_CANCELLED": on_cancelled,
        "SUBSCRIPTION_MODIFIED_IMMEDIATE": on_modified_immediate,
        "SUBSCRIPTION_MODIFIED_DEFERRED": on_modified_deferred,
    }

    def on_one_time(self) -> None:
        product = as_str(self.receipt.get("productId"))
        self._add(EventType.ONE_TIME_PURCHASE, product_id=product, transaction_id=self.rtn.receipt_id)

    # -- building blocks --

    def _require_receipt(self) -> None:
        if not self.receipt:
            raise InvalidEvent("the receipt was not fetched", "rvs.receipt")
        echoed = self.receipt.get("receiptId")
        if echoed is not None and echoed != self.rtn.receipt_id:
            raise InvalidEvent("is not the notification's receipt", "rvs.receipt.receiptId")

    def _root(self, receipt: str) -> str:
        """The chain's first receipt: what the log knows for `receipt`, else `receipt` itself."""
        if self.chain is not None:
            found = self.chain(receipt)
            if isinstance(found, str) and found and len(found) <= 500:
                return found
        return receipt

    def _time(self, name: str) -> datetime | None:
        value = self.receipt.get(name)
        return None if value is None else unix_time(value, f"rvs.receipt.{name}")

    def _period_end(self) -> datetime | None:
        """Where the paid access ends: the next renewal, else (auto-renew off) the cancel date."""
        return self._time("renewalDate") or self._time("cancelDate")

    def _cancel_reason(self) -> int | None:
        value = self.receipt.get("cancelReason")
        if value is None:
            return None
        if as_int(value) is None:
            raise InvalidEvent("must be an integer", "rvs.receipt.cancelReason")
        return as_int(value)

    def _product(self) -> str | None:
        for name in ("termSku", "productId"):
            value = self.receipt.get(name)
            if value is not None:
                if not isinstance(value, str) or not value.strip():
                    raise InvalidEvent("must be a non-empty string", f"rvs.receipt.{name}")
                return value
        return None

    def _promotion(self) -> PeriodType:
        """The phase an in-progress promotion puts the charge in (a queued one starts later)."""
        for promotion in as_list(self.receipt.get("promotions")):
            status = as_str(as_dict(promotion).get("promotionStatus"))
            kind = as_str(as_dict(promotion).get("promotionType")) or ""
            if status == "InProgress" and kind.startswith("Introductory"):
                return PeriodType.INTRO
            if status == "InProgress" and kind.startswith("Promotional"):
                return PeriodType.PROMOTIONAL
        return PeriodType.NORMAL

    def _charge(self, kind: EventType) -> None:
        """A renewal-like charge; RVS has no per-charge id, so the period it pays for names it."""
        end = self._period_end()
        key = _ms(end) if end is not None else _ms(self.rtn.event_time)
        self._add(kind, product_id=self._product(), period_type=self._promotion(), expires_at=end,
                  transaction_id=f"{self.rtn.receipt_id}:{key}")

    def _environment(self) -> str:
        test = self.receipt.get("testTransaction") is True or self.receipt.get("betaProduct") is True
        return "sandbox" if self.fetched.environment == "sandbox" or test or self.rtn.beta else "production"

    def _add(self, kind: EventType, **fields: Any) -> None:
        one_time = kind is EventType.ONE_TIME_PURCHASE
        if not one_time and not self.subscription_id:
            raise InvalidEvent(f"is required for {self.rtn.notification_type}", "Message.receiptId")
        index = len(self.facts)
        facts: dict[str, Any] = {
            "id": fact_id(self.rtn.external_id, index),
            "source": Source.AMAZON.value,
            "app_id": self.config.app_id,
            "type": kind.value,
            "occurred_at": format_time(self.rtn.event_time),
            "subscription_id": None if one_time else self.subscription_id,
            "store": Store.AMAZON.value,
            "environment": self._environment(),
            "app_user_id": self.rtn.app_user_id,
            "country_code": country_code(self.receipt.get("countryCode")),
        }
        attributes: dict[str, Any] = {
            "amazon_notification": self.rtn.notification_type,
            "amazon_receipt_id": self.rtn.receipt_id,
            "amazon_parent_sku": as_str(self.receipt.get("productId")),
            "amazon_term": as_str(self.receipt.get("term")),
            "auto_renewing": self.receipt.get("autoRenewing") if isinstance(self.receipt.get("autoRenewing"),
                                                                            bool) else None,
        }
        attributes.update(fields.pop("attributes", {}))
        if index == 0:
            attributes["amazon_fetched"] = self.fetched.to_json()
        facts.update((name, fact_value(value)) for name, value in fields.items())
        facts["attributes"] = {k: v for k, v in attributes.items() if v is not None}
        self.facts.append({k: v for k, v in facts.items() if v is not None})


# --- tolerant readers --------------------------------------------------------------------------


def _id(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent("is required", name)
    if len(value) > limit:
        raise InvalidEvent(f"longer than {limit} characters", name)
    if "\x00" in value:
        raise InvalidEvent("must not contain NUL", name)
    return value


def _ms(when: datetime) -> int:
    delta = when - events.EARLIEST_TIME
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
