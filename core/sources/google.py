"""Google Play Real-time developer notifications (RTDN) → canonical events.

Why this module looks the way it does:

* A notification is a Pub/Sub push: `{"message": {"data": base64(DeveloperNotification),
  "messageId", ...}, "subscription"}`, or, with payload unwrapping, the bare DeveloperNotification
  (the message id then comes from the `x-goog-pubsub-message-id` header when Pub/Sub writes
  metadata). Both are read. The idempotency key is the Pub/Sub `messageId`; an unwrapped push without
  one gets a digest of the notification itself (`rtdn:<sha256>`), so a redelivery is still one entry.
* RTDN carries no price, no phase and no user: the caller fetches `purchases.subscriptionsv2.get`
  (and the order, for money) and passes what it got as `Fetched`. `core` does no I/O; it only says
  what to fetch (`Push.wants_subscription`, `order_to_fetch`) and maps what was fetched, so a replay
  of the log's facts never calls Google. The fetched JSON is kept in the first fact's attributes
  (`google_fetched`), beside the push body stored verbatim as the raw entry.
* Facts only: a renewal is a `renewal`; whether it converts a trial is the fold's decision. The phase
  of a charge is read from its order (`offerPhaseDetails`) when the order was fetched, else from the
  subscription's current `offerPhase`: an order describes the charge it belongs to even when it is
  fetched late, the subscription only describes now.
* One subscription across a `linkedPurchaseToken` chain (upgrade, downgrade, re-signup before
  expiry) and across a resubscribe after expiry (`outOfAppPurchaseContext.expiredPurchaseToken`):
  `subscription_id` is the oldest token of the chain subledger knows. The caller injects
  `ChainLookup` (token → subscription id already logged for it); without an answer the linked token
  itself is the id, which is the chain's first token whenever the chain is two tokens long.
* A fetch that Google answers 404/410 (the token is unknown, or expired more than 60 days ago) is
  not retried: the notification is stored with no facts, and its kind says why
  (`SUBSCRIPTION_RENEWED/NOT_FOUND`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from subledger.core import events, safejson
from subledger.core.errors import ConfigError, InvalidEvent, MalformedPayload
from subledger.core.events import (
    EventType,
    PeriodType,
    Reason,
    Source,
    Store,
    format_time,
    is_currency_code,
    parse_time,
)
from subledger.core.sources import Notification
from subledger.core.sources.payload import (
    as_dict,
    as_int,
    as_str,
    country_code,
    dig,
    fact_id,
    fact_value,
    unix_time,
)

MAX_TOKEN = 450  # a subscription id is at most 500 characters; Play tokens are far shorter

SUBSCRIPTION_TYPES = {
    1: "SUBSCRIPTION_RECOVERED",
    2: "SUBSCRIPTION_RENEWED",
    3: "SUBSCRIPTION_CANCELED",
    4: "SUBSCRIPTION_PURCHASED",
    5: "SUBSCRIPTION_ON_HOLD",
    6: "SUBSCRIPTION_IN_GRACE_PERIOD",
    7: "SUBSCRIPTION_RESTARTED",
    8: "SUBSCRIPTION_PRICE_CHANGE_CONFIRMED",
    9: "SUBSCRIPTION_DEFERRED",
    10: "SUBSCRIPTION_PAUSED",
    11: "SUBSCRIPTION_PAUSE_SCHEDULE_CHANGED",
    12: "SUBSCRIPTION_REVOKED",
    13: "SUBSCRIPTION_EXPIRED",
    17: "SUBSCRIPTION_ITEMS_CHANGED",
    18: "SUBSCRIPTION_CANCELLATION_SCHEDULED",
    19: "SUBSCRIPTION_PRICE_CHANGE_UPDATED",
    20: "SUBSCRIPTION_PENDING_PURCHASE_CANCELED",
    22: "SUBSCRIPTION_PRICE_STEP_UP_CONSENT_UPDATED",
}
ONE_TIME_TYPES = {1: "ONE_TIME_PRODUCT_PURCHASED", 2: "ONE_TIME_PRODUCT_CANCELED"}
# Subscription notifications that state a fact, so they need the subscription's state fetched.
FACT_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 17, 18})
CANCEL_REASON = {
    "userInitiatedCancellation": Reason.UNSUBSCRIBE,
    "systemInitiatedCancellation": Reason.BILLING_ERROR,
    "developerInitiatedCancellation": Reason.DEVELOPER_INITIATED,
}
FAILURE_SUFFIX = {404: "NOT_FOUND", 410: "GONE"}
_RENEWAL_SUFFIX = re.compile(r"\.\.\d+$")

ChainLookup = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class GoogleConfig:
    """One app's Play settings: `package_name` routes notifications, `app_id` names the app."""

    app_id: str
    package_name: str

    def __post_init__(self) -> None:
        if not self.app_id:
            raise ConfigError("google.app_id", "must not be empty")
        if not self.package_name:
            raise ConfigError("google.package_name", "must not be empty")


@dataclass(frozen=True, slots=True)
class Push:
    """A parsed push: the DeveloperNotification and what it names, before anything is fetched."""

    external_id: str
    message_id: str | None
    subscription: str | None
    package_name: str
    event_time: datetime
    kind: str
    family: str  # subscription | one_time | voided | test | other
    notification_type: int | None = None
    purchase_token: str | None = None
    sku: str | None = None
    order_id: str | None = None
    product_type: int | None = None
    refund_type: int | None = None
    # what a body reconciliation built says of its origin (`subledgerReconciliation`), as fact attributes
    reconciled: tuple[tuple[str, str], ...] = ()

    @property
    def wants_subscription(self) -> bool:
        """Whether mapping this push needs `purchases.subscriptionsv2.get` of its token."""
        if self.family == "subscription":
            return self.notification_type in FACT_TYPES
        return self.family == "voided" and self.product_type == 1

    @property
    def wants_product(self) -> bool:
        """Whether mapping needs `purchases.products.get` (a one-time product bought)."""
        return self.family == "one_time" and self.notification_type == 1 and self.sku is not None


@dataclass(frozen=True, slots=True)
class Failure:
    """A fetch Google refused for good (404/410): the entry is stored with no facts."""

    status: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Fetched:
    """What the caller got from the Play Developer API for one push (JSON objects as Google sent)."""

    subscription: Mapping[str, Any] | None = None
    order: Mapping[str, Any] | None = None
    product: Mapping[str, Any] | None = None
    failure: Failure | None = None
    order_error: str | None = None  # why the order (money) is missing, when it is

    def to_json(self) -> dict[str, Any]:
        """The form kept in the log (`google_fetched`) and accepted back by `from_json`."""
        out: dict[str, Any] = {}
        if self.subscription is not None:
            out["subscriptionsv2"] = dict(self.subscription)
        if self.order is not None:
            out["order"] = dict(self.order)
        if self.product is not None:
            out["product"] = dict(self.product)
        if self.failure is not None:
            out["failure"] = self.failure.to_json()
        if self.order_error is not None:
            out["order_error"] = self.order_error
        return out

    @classmethod
    def from_json(cls, value: Any) -> Fetched:
        """A stored `google_fetched` object (a replayed capture line) → Fetched; strict about shapes."""
        if not isinstance(value, dict):
            raise MalformedPayload("must be an object", "subledger_fetched")
        parts: dict[str, Any] = {}
        for name, key in (("subscription", "subscriptionsv2"), ("order", "order"), ("product", "product")):
            part = value.get(key)
            if part is not None and not isinstance(part, dict):
                raise MalformedPayload("must be an object", f"subledger_fetched.{key}")
            parts[name] = part
        failure = value.get("failure")
        parsed_failure = None
        if failure is not None:
            status = as_dict(failure).get("status")
            if not isinstance(status, int) or isinstance(status, bool):
                raise MalformedPayload("must be {status, reason}", "subledger_fetched.failure")
            parsed_failure = Failure(status, as_str(as_dict(failure).get("reason")) or "")
        return cls(failure=parsed_failure, order_error=as_str(value.get("order_error")), **parts)


# --- parsing the push --------------------------------------------------------------------------


def parse_push(body: bytes, *, message_id: str | None = None) -> Push:
    """A push body (enveloped or unwrapped) → Push; raises MalformedPayload / InvalidEvent.

    `message_id`: the `x-goog-pubsub-message-id` header of an unwrapped push, when present.
    """
    obj = _json_object(body, "body")
    subscription: str | None = None
    if "message" in obj:
        message = obj.get("message")
        if not isinstance(message, dict):
            raise MalformedPayload("must be an object", "message")
        data = message.get("data")
        if not isinstance(data, str) or not data:
            raise MalformedPayload("is required and must be base64 text", "message.data")
        try:
            decoded = base64.b64decode(data.encode("ascii"), validate=True)
        except (ValueError, binascii.Error):
            try:
                decoded = base64.urlsafe_b64decode(data.encode("ascii") + b"=" * (-len(data) % 4))
            except (ValueError, binascii.Error):
                raise MalformedPayload("is not base64", "message.data") from None
        notification = _json_object(decoded, "message.data")
        message_id = as_str(message.get("messageId")) or as_str(message.get("message_id"))
        if message_id is None:
            raise MalformedPayload("is required", "message.messageId")
        subscription = as_str(obj.get("subscription"))
    else:
        notification = obj
    return _push(notification, message_id, subscription)


def _push(notification: dict[str, Any], message_id: str | None, subscription: str | None) -> Push:
    package = notification.get("packageName")
    if not isinstance(package, str) or not package.strip():
        raise MalformedPayload("is required (not a DeveloperNotification)", "packageName")
    if len(package) > 200:
        raise InvalidEvent("longer than 200 characters", "packageName")
    event_time = unix_time(notification.get("eventTimeMillis"), "eventTimeMillis", text=True)  # int64 as a string
    if message_id is not None and (len(message_id) > 200 or "\x00" in message_id):
        raise InvalidEvent("longer than 200 characters or contains NUL", "message.messageId")
    external_id = message_id or "rtdn:" + hashlib.sha256(
        json.dumps(notification, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:48]
    common: dict[str, Any] = {
        "external_id": external_id,
        "message_id": message_id,
        "subscription": subscription[:500] if subscription else None,
        "package_name": package,
        "event_time": event_time,
        "reconciled": _reconciled(notification.get(RECONCILED)),
    }
    if isinstance(notification.get("subscriptionNotification"), dict):
        sub = notification["subscriptionNotification"]
        kind_code = _code(sub.get("notificationType"), "subscriptionNotification.notificationType")
        token = _token(sub.get("purchaseToken"), "subscriptionNotification.purchaseToken")
        kind = SUBSCRIPTION_TYPES.get(kind_code, f"SUBSCRIPTION_{kind_code}")
        return Push(kind=kind, family="subscription", notification_type=kind_code, purchase_token=token, **common)
    if isinstance(notification.get("oneTimeProductNotification"), dict):
        one = notification["oneTimeProductNotification"]
        kind_code = _code(one.get("notificationType"), "oneTimeProductNotification.notificationType")
        token = _token(one.get("purchaseToken"), "oneTimeProductNotification.purchaseToken")
        sku = as_str(one.get("sku"))
        if sku is not None and (len(sku) > 200 or "\x00" in sku):
            raise InvalidEvent("longer than 200 characters or contains NUL", "oneTimeProductNotification.sku")
        kind = ONE_TIME_TYPES.get(kind_code, f"ONE_TIME_PRODUCT_{kind_code}")
        return Push(kind=kind, family="one_time", notification_type=kind_code, purchase_token=token, sku=sku,
                    **common)
    if isinstance(notification.get("voidedPurchaseNotification"), dict):
        voided = notification["voidedPurchaseNotification"]
        token = _token(voided.get("purchaseToken"), "voidedPurchaseNotification.purchaseToken")
        order = as_str(voided.get("orderId"))
        if order is None or len(order) > 200 or "\x00" in order:
            raise InvalidEvent("is required (≤ 200 characters)", "voidedPurchaseNotification.orderId")
        return Push(kind="VOIDED_PURCHASE", family="voided", purchase_token=token, order_id=order,
                    product_type=as_int(voided.get("productType")), refund_type=as_int(voided.get("refundType")),
                    **common)
    if isinstance(notification.get("testNotification"), dict):
        return Push(kind="TEST", family="test", **common)
    if isinstance(notification.get("pendingRefundReviewNotification"), dict):
        return Push(kind="PENDING_REFUND_REVIEW", family="other", **common)
    return Push(kind="UNKNOWN", family="other", **common)


# --- what to fetch -----------------------------------------------------------------------------


def order_to_fetch(push: Push, subscription: Mapping[str, Any] | None, product: Mapping[str, Any] | None) -> str | None:
    """The order whose money (and phase) this push states, or None when it states no charge.

    A purchase is its first order: a renewal's id is the first id plus `..N`, so a purchase fetched
    after a renewal still finds its own order by dropping the suffix.
    """
    if push.family == "voided":
        return push.order_id
    if push.family == "one_time":
        return as_str(as_dict(product).get("orderId"))
    if push.family != "subscription" or subscription is None:
        return None
    latest = _latest_order(subscription)
    if latest is None:
        return None
    if push.notification_type == 4:
        return _RENEWAL_SUFFIX.sub("", latest)
    if push.notification_type in (1, 2, 12):
        return latest
    return None


def _latest_order(subscription: Mapping[str, Any]) -> str | None:
    line = _line_item(subscription)
    return as_str(line.get("latestSuccessfulOrderId")) or as_str(subscription.get("latestOrderId"))


# --- mapping -----------------------------------------------------------------------------------


def map_push(
    push: Push, fetched: Fetched, config: GoogleConfig, *, chain: ChainLookup | None = None
) -> Notification:
    """A push and what was fetched for it → a Notification (facts, or stored only)."""
    if push.package_name != config.package_name:
        raise InvalidEvent(f"{push.package_name!r} is not {config.package_name!r}", "packageName")
    return _Mapping(push, fetched, config, chain).notification()


def stream_key(app_id: str, subscription_id: str) -> str:
    """The subscription key a Play subscription's events get (for stored-only notifications)."""
    return events.stream_key(app_id, Store.PLAY_STORE, subscription_id)


class _Mapping:
    """The mapping of one push; one method per notification family."""

    def __init__(self, push: Push, fetched: Fetched, config: GoogleConfig, chain: ChainLookup | None) -> None:
        self.push = push
        self.fetched = fetched
        self.config = config
        self.chain = chain
        self.sub: dict[str, Any] = as_dict(fetched.subscription)
        self.line = _line_item(self.sub)
        self.order: dict[str, Any] = as_dict(fetched.order)
        self.product: dict[str, Any] = as_dict(fetched.product)
        self.kind = push.kind
        self.subscription_id: str | None = None
        self.facts: list[dict[str, Any]] = []

    def notification(self) -> Notification:
        push = self.push
        if self.fetched.failure is not None:
            suffix = FAILURE_SUFFIX.get(self.fetched.failure.status, f"HTTP_{self.fetched.failure.status}")
            self.kind = f"{push.kind}/{suffix}"
            self.subscription_id = self._known_subscription()
        elif push.family == "subscription" and push.notification_type in FACT_TYPES:
            self._require_subscription()
            self.subscription_id = self._chain_root()
            handler = self.HANDLERS.get(push.notification_type or 0)
            if handler is not None:
                handler(self)
        elif push.family == "voided":
            self.on_voided()
        elif push.family == "one_time":
            self.on_one_time()
        elif push.family == "subscription":
            self.subscription_id = self._known_subscription()
        stored = stream_key(self.config.app_id, self.subscription_id) if self.subscription_id else None
        return Notification.from_facts(
            Source.GOOGLE, push.external_id, self.config.app_id, self.kind[:200], self.facts, stored_key=stored
        )

    # -- subscription notifications --

    def on_purchased(self) -> None:
        linked = as_str(self.sub.get("linkedPurchaseToken"))
        if linked is None:
            self._charge(EventType.PURCHASE)
            return
        # Upgrade, downgrade or re-signup before expiry: the same subscription under a new token.
        self._add(EventType.PRODUCT_CHANGE, new_product_id=self._product(), expires_at=self._expiry())
        if self._auto_renew() is True:
            self._add(EventType.AUTO_RENEW_ENABLED, expires_at=self._expiry())
        price, _ = self._money()
        if price is not None and price > 0:
            self._charge(EventType.RENEWAL)

    def on_renewed(self) -> None:
        self._charge(EventType.RENEWAL)

    def on_recovered(self) -> None:
        self._charge(EventType.BILLING_RECOVERED)

    def on_canceled(self) -> None:
        context = as_dict(self.sub.get("canceledStateContext"))
        if "replacementCancellation" in context:
            self.kind = f"{self.push.kind}/REPLACED"
            return  # the old token of an upgrade/downgrade: part of a product change, not churn
        reason = next((r for name, r in CANCEL_REASON.items() if name in context), None)
        self._add(EventType.AUTO_RENEW_DISABLED, reason=reason, expires_at=self._expiry())

    def on_cancellation_scheduled(self) -> None:
        self._add(EventType.AUTO_RENEW_DISABLED, reason=Reason.UNSUBSCRIBE, expires_at=self._expiry())

    def on_restarted(self) -> None:
        self._add(EventType.AUTO_RENEW_ENABLED, expires_at=self._expiry())

    def on_billing_issue(self) -> None:
        attributes = {"google_state": as_str(self.sub.get("subscriptionState"))}
        self._add(EventType.BILLING_ISSUE, expires_at=self._expiry(), attributes=attributes)

    def on_pause_scheduled(self) -> None:
        self._add(EventType.PAUSE_SCHEDULED, expires_at=self._expiry())

    def on_paused(self) -> None:
        resume = as_str(as_dict(self.sub.get("pausedStateContext")).get("autoResumeTime"))
        self._add(EventType.PAUSED, attributes={"auto_resume_time": resume})

    def on_revoked(self) -> None:
        self._refund(self._order_id())
        self._add(EventType.EXPIRATION, reason=Reason.CUSTOMER_SUPPORT)

    def on_expired(self) -> None:
        context = as_dict(self.sub.get("canceledStateContext"))
        if "replacementCancellation" in context:
            self.kind = f"{self.push.kind}/REPLACED"
            return
        reason = next((r for name, r in CANCEL_REASON.items() if name in context), Reason.UNKNOWN)
        self._add(EventType.EXPIRATION, reason=reason, expires_at=self._expiry())

    def on_deferred(self) -> None:
        self._add(EventType.EXTENDED, expires_at=self._expiry())

    def on_items_changed(self) -> None:
        self._add(EventType.PRODUCT_CHANGE, new_product_id=self._product(), expires_at=self._expiry())

    HANDLERS: dict[int, Callable[[_Mapping], None]] = {
        1: on_recovered,
        2: on_renewed,
        3: on_canceled,
        4: on_purchased,
        5: on_billing_issue,
        6: on_billing_issue,
        7: on_restarted,
        9: on_deferred,
        10: on_paused,
        11: on_pause_scheduled,
        12: on_revoked,
        13: on_expired,
        17: on_items_changed,
        18: on_cancellation_scheduled,
    }

    # -- other families --

    def on_voided(self) -> None:
        if self.push.product_type != 1:
            return  # a refunded one-time product: no subscription stream to state it on (stored only)
        self._require_subscription()
        self.subscription_id = self._chain_root()
        self._refund(self.push.order_id, partial=self.push.refund_type == 2)

    def on_one_time(self) -> None:
        if self.push.notification_type != 1:
            return  # canceled pending purchase: nothing was bought
        if not self.product:
            raise InvalidEvent("the one-time purchase was not fetched", "purchases.products")
        if as_int(self.product.get("purchaseState")) not in (None, 0):
            self.kind = f"{self.push.kind}/NOT_PURCHASED"
            return  # pending (2) or canceled (1)
        price, currency = self._money()
        self._add(
            EventType.ONE_TIME_PURCHASE,
            product_id=self.push.sku,
            price=price,
            currency=currency,
            transaction_id=as_str(self.product.get("orderId")) or self.push.purchase_token,
        )

    # -- building blocks --

    def _require_subscription(self) -> None:
        if not self.sub:
            raise InvalidEvent("the subscription was not fetched", "purchases.subscriptionsv2")

    def _lookup(self, token: str | None) -> str | None:
        if token is None or self.chain is None:
            return None
        found = self.chain(token)
        return found if isinstance(found, str) and found and len(found) <= 500 else None

    def _known_subscription(self) -> str | None:
        token = self.push.purchase_token
        if token is None or self.push.family == "one_time":
            return None
        return self._lookup(token) or token

    def _chain_root(self) -> str:
        token = self.push.purchase_token
        assert token is not None
        found = self._lookup(token)
        if found:
            return found
        for earlier in (
            as_str(self.sub.get("linkedPurchaseToken")),
            as_str(as_dict(self.sub.get("outOfAppPurchaseContext")).get("expiredPurchaseToken")),
        ):
            if earlier and earlier != token and len(earlier) <= MAX_TOKEN:
                return self._lookup(earlier) or earlier
        return token

    def _product(self) -> str | None:
        return as_str(self.line.get("productId"))

    def _expiry(self) -> datetime | None:
        return _maybe_time(self.line.get("expiryTime"))

    def _auto_renew(self) -> bool | None:
        plan = self.line.get("autoRenewingPlan")
        value = as_dict(plan).get("autoRenewEnabled")
        return value if isinstance(value, bool) else None

    def _order_id(self) -> str | None:
        return as_str(self.order.get("orderId")) or order_to_fetch(self.push, self.sub, self.product)

    def _phase(self) -> PeriodType:
        """The charge's phase: its order's `offerPhaseDetails`, else the subscription's `offerPhase`."""
        details = as_dict(dig(_order_line(self.order), "subscriptionDetails", "offerPhaseDetails"))
        if not details:
            details = as_dict(dig(_order_line(self.order), "subscriptionDetails", "offerPhase"))
        if details:
            if "freeTrialDetails" in details or "freeTrial" in details:
                return PeriodType.TRIAL
            if "introductoryPriceDetails" in details or "introductoryPrice" in details:
                return PeriodType.INTRO
            return PeriodType.NORMAL
        phase = as_dict(self.line.get("offerPhase"))
        if "freeTrial" in phase:
            return PeriodType.TRIAL
        if "introductoryPrice" in phase:
            return PeriodType.INTRO
        if "prepaidPlan" in self.line:
            return PeriodType.PREPAID
        return PeriodType.NORMAL

    def _money(self) -> tuple[Decimal | None, str | None]:
        """What the buyer paid for the order (tax included), in their currency; None when unknown."""
        money = as_dict(self.order.get("total")) or as_dict(_order_line(self.order).get("total"))
        return _money(money, "order.total")

    def _charge(self, kind: EventType) -> None:
        phase = self._phase()
        price, currency = self._money()
        attributes: dict[str, Any] = {}
        if price is None and phase is PeriodType.TRIAL:
            # a free trial charges nothing; the currency is the plan's
            currency = as_str(as_dict(dig(self.line, "autoRenewingPlan", "recurringPrice")).get("currencyCode"))
            price = Decimal(0) if currency else None
        elif price is None and phase is PeriodType.NORMAL:
            # no order (not fetched, or not permitted): the plan's current recurring price, an estimate
            price, currency = _money(as_dict(dig(self.line, "autoRenewingPlan", "recurringPrice")), "recurringPrice")
            if price is not None:
                attributes["price_source"] = "recurring_price"
        self._add(
            kind,
            product_id=self._product(),
            period_type=phase,
            price=price,
            currency=currency if price is not None else None,
            expires_at=self._expiry(),
            transaction_id=self._order_id(),
            attributes=attributes,
        )

    def _refund(self, order_id: str | None, *, partial: bool = False) -> None:
        price, currency = (None, None) if partial else self._money()
        self._add(
            EventType.REFUND,
            product_id=self._product(),
            price=None if price is None else -price,
            currency=currency if price is not None else None,
            transaction_id=order_id,
            attributes={"refund_type": "partial" if partial else "full"},
        )

    def _user(self) -> str | None:
        ids = as_dict(self.sub.get("externalAccountIdentifiers"))
        found = as_str(ids.get("obfuscatedExternalAccountId")) or as_str(
            self.product.get("obfuscatedExternalAccountId")
        )
        return found if found is None or len(found) <= 500 else None

    def _environment(self) -> str:
        if "testPurchase" in self.sub or as_int(self.product.get("purchaseType")) == 0:
            return "sandbox"
        return "production"

    def _country(self) -> str | None:
        return country_code(as_str(self.sub.get("regionCode")) or as_str(self.product.get("regionCode")))

    def _add(self, kind: EventType, **fields: Any) -> None:
        one_time = kind is EventType.ONE_TIME_PURCHASE
        if not one_time and not self.subscription_id:
            raise InvalidEvent(f"is required for {self.push.kind}", "purchaseToken")
        index = len(self.facts)
        facts: dict[str, Any] = {
            "id": fact_id(self.push.external_id, index),
            "source": Source.GOOGLE.value,
            "app_id": self.config.app_id,
            "type": kind.value,
            "occurred_at": format_time(self.push.event_time),
            "subscription_id": None if one_time else self.subscription_id,
            "store": Store.PLAY_STORE.value,
            "environment": self._environment(),
            "app_user_id": self._user(),
            "country_code": self._country(),
        }
        attributes: dict[str, Any] = {
            "google_notification": self.push.kind,
            "google_purchase_token": self.push.purchase_token,
            "google_state": as_str(self.sub.get("subscriptionState")),
            "base_plan_id": as_str(dig(self.line, "offerDetails", "basePlanId")),
            "offer_id": as_str(dig(self.line, "offerDetails", "offerId")),
            **dict(self.push.reconciled),
        }
        attributes.update(fields.pop("attributes", {}))
        if index == 0:
            attributes["google_fetched"] = self.fetched.to_json()
        facts.update((name, fact_value(value)) for name, value in fields.items())
        facts["attributes"] = {k: v for k, v in attributes.items() if v is not None}
        self.facts.append({k: v for k, v in facts.items() if v is not None})


# --- tolerant readers: hostile JSON yields None, never an exception ----------------------------


def _json_object(raw: bytes, name: str) -> dict[str, Any]:
    obj = safejson.loads(raw, what=name)
    if not isinstance(obj, dict):
        raise MalformedPayload("must be a JSON object", name)
    return obj


def _line_item(subscription: Mapping[str, Any]) -> dict[str, Any]:
    items = subscription.get("lineItems")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                return item
    return {}


def _order_line(order: Mapping[str, Any]) -> dict[str, Any]:
    return _line_item(order)


def _code(value: Any, name: str) -> int:
    code = as_int(value)
    if code is None and isinstance(value, str) and value.isdigit() and len(value) < 6:
        code = int(value)
    if code is None or not 0 <= code < 10_000:
        raise InvalidEvent("must be an integer notification type", name)
    return code


def _token(value: Any, name: str) -> str:
    token = as_str(value)
    if token is None or not token.strip():
        raise InvalidEvent("is required", name)
    if len(token) > MAX_TOKEN:
        raise InvalidEvent(f"longer than {MAX_TOKEN} characters", name)
    if "\x00" in token:
        raise InvalidEvent("must not contain NUL", name)
    return token


def _maybe_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value, "expiryTime")
    except InvalidEvent:
        return None


def _money(money: Mapping[str, Any], name: str) -> tuple[Decimal | None, str | None]:
    """Google's Money `{currencyCode, units (int64 as a string), nanos}` → (amount, currency)."""
    currency = as_str(money.get("currencyCode"))
    units, nanos = money.get("units", "0"), money.get("nanos", 0)
    if currency is None or not is_currency_code(currency):
        return None, None
    try:
        whole = Decimal(units if isinstance(units, str | int) and not isinstance(units, bool) else "x")
        part = Decimal(nanos if isinstance(nanos, int) and not isinstance(nanos, bool) else "x")
    except InvalidOperation:
        raise InvalidEvent("units and nanos must be integers", name) from None
    if not whole.is_finite() or whole != whole.to_integral_value() or abs(whole) >= Decimal("1e11"):
        raise InvalidEvent("units must be an integer amount", name)
    if abs(part) >= Decimal(1_000_000_000):
        raise InvalidEvent("nanos out of range", name)
    amount = (whole + part.scaleb(-9)).normalize()
    if amount < 0:
        raise InvalidEvent("must not be negative", name)
    return (amount.quantize(Decimal(1)) if amount == amount.to_integral_value() else amount), currency


# --- reconciliation: what the Play Developer API says, as the push it stands for ---------------
#
# A reconciler logs what it learns from Google as the DeveloperNotification a push would have carried
# (unwrapped, without a message id), so the mapping above makes its facts and its external id is that
# body's digest (`rtdn:<sha256>`, as for any unwrapped push): a second run builds the same body from
# the same answer and is a duplicate, and a capture line of it (the body plus `subledger_fetched`)
# maps back to the same facts without Google. A push of the same fact that arrives later has its own
# message id, so it is an entry of its own whose facts the fold finds already applied (the same order
# refunded or charged, an expiration after an expiration). The body names its origin under
# `subledgerReconciliation`, which the mapping ignores.

RECONCILED = "subledgerReconciliation"
VOIDED_SOURCES = {0: "user", 1: "developer", 2: "google"}
VOIDED_REASONS = {0: "other", 1: "remorse", 2: "not_received", 3: "defective", 4: "accidental_purchase", 5: "fraud",
                  6: "friendly_fraud", 7: "chargeback", 8: "unacknowledged_purchase"}
ACTIVE = "SUBSCRIPTION_STATE_ACTIVE"
CANCELED = "SUBSCRIPTION_STATE_CANCELED"
EXPIRED = "SUBSCRIPTION_STATE_EXPIRED"
IN_GRACE = "SUBSCRIPTION_STATE_IN_GRACE_PERIOD"
ON_HOLD = "SUBSCRIPTION_STATE_ON_HOLD"
PAUSED = "SUBSCRIPTION_STATE_PAUSED"
_EPOCH_MS = 1000


@dataclass(frozen=True, slots=True)
class Voided:
    """One `purchases.voidedpurchases.list` item: a purchase or renewal order refunded, revoked or charged back."""

    purchase_token: str
    order_id: str
    voided_at: datetime
    voided_source: int | None = None  # 0 user, 1 developer, 2 Google
    voided_reason: int | None = None  # 0 other, 1 remorse, ..., 7 chargeback (Google's numbering)


def parse_voided(item: Any) -> Voided:
    """A listed VoidedPurchase → Voided; raises MalformedPayload / InvalidEvent naming the field."""
    if not isinstance(item, dict):
        raise MalformedPayload("must be an object", "voidedPurchases[]")
    token = _token(item.get("purchaseToken"), "voidedPurchases[].purchaseToken")
    order = as_str(item.get("orderId"))
    if order is None or len(order) > 200 or "\x00" in order:
        raise InvalidEvent("is required (≤ 200 characters)", "voidedPurchases[].orderId")
    voided_at = unix_time(item.get("voidedTimeMillis"), "voidedPurchases[].voidedTimeMillis", text=True)
    return Voided(token, order, voided_at, as_int(item.get("voidedSource")), as_int(item.get("voidedReason")))


def voided_body(package: str, voided: Voided, subscription: Mapping[str, Any] | None) -> bytes:
    """The push a voided subscription order stands for, given the subscription as fetched now.

    A `voidedPurchaseNotification` (a refund of the order), unless Google's state shows access ended
    with it (expired, its latest order the voided one): then `SUBSCRIPTION_REVOKED`, the refund and
    the expiration the push path logs for a revocation. Dated when Google voided the order.
    """
    revoked = (
        subscription is not None
        and subscription.get("subscriptionState") == EXPIRED
        and _latest_order(subscription) == voided.order_id
    )
    inner: dict[str, Any]
    if revoked:
        inner = {"subscriptionNotification": {"version": "1.0", "notificationType": 12,
                                              "purchaseToken": voided.purchase_token}}
    else:
        inner = {"voidedPurchaseNotification": {"purchaseToken": voided.purchase_token, "orderId": voided.order_id,
                                                "productType": 1, "refundType": 1}}
    origin = {"resource": "purchases.voidedpurchases", "voidedSource": voided.voided_source,
              "voidedReason": voided.voided_reason}
    return _reconciled_body(package, voided.voided_at, inner, origin)


def voided_probe(package: str, voided: Voided) -> Push:
    """The voided push before anything is fetched: what `fetch` needs (the token, the order)."""
    return parse_push(voided_body(package, voided, None))


def sweep_body(
    package: str, token: str, subscription: Mapping[str, Any], *, known_expiry: datetime, billing_issue: bool
) -> bytes | None:
    """The push a live-but-ended subscription's fetched state stands for, or None when it says nothing new.

    Against the projection (`known_expiry`, `billing_issue`): a later expiry while active (or
    cancelled) is a renewal at the end of the known period (a recovery when a billing issue was
    open); expired (or cancelled and ended) is the expiration, dated at Google's expiry; grace or
    hold opens a billing issue, paused a pause, at the known period end. Still active with the same
    expiry (Google has not renewed yet), pending, or the old token of a replacement: nothing.
    """
    state = as_str(subscription.get("subscriptionState"))
    expiry = _maybe_time(_line_item(subscription).get("expiryTime"))
    if "replacementCancellation" in as_dict(subscription.get("canceledStateContext")):
        return None  # the old token of an upgrade/downgrade: the new token tells what happened
    kind: int
    at = known_expiry
    if state in (ACTIVE, CANCELED) and expiry is not None and expiry > known_expiry:
        kind = 1 if billing_issue else 2
    elif state == EXPIRED or (state == CANCELED and expiry is not None and expiry <= known_expiry):
        kind, at = 13, expiry or known_expiry
    elif state in (IN_GRACE, ON_HOLD) and not billing_issue:
        kind = 6 if state == IN_GRACE else 5
    elif state == PAUSED:
        kind = 10
    else:
        return None
    inner = {"subscriptionNotification": {"version": "1.0", "notificationType": kind, "purchaseToken": token}}
    return _reconciled_body(package, at, inner, {"resource": "purchases.subscriptionsv2", "state": state})


def _reconciled(origin: Any) -> tuple[tuple[str, str], ...]:
    """The attributes a reconciled body's origin gives its facts: which API said it, and for a voided
    order who voided it and why (`google_voided_source`: user/developer/google, `google_voided_reason`)."""
    if not isinstance(origin, dict):
        return ()
    source, reason = as_int(origin.get("voidedSource")), as_int(origin.get("voidedReason"))
    found = {
        "google_reconciled_from": as_str(origin.get("resource")),
        "google_voided_source": None if source is None else VOIDED_SOURCES.get(source),
        "google_voided_reason": None if reason is None else VOIDED_REASONS.get(reason),
    }
    return tuple((k, v[:100]) for k, v in found.items() if v)


def _reconciled_body(package: str, at: datetime, inner: dict[str, Any], origin: dict[str, Any]) -> bytes:
    millis = int(at.timestamp()) * _EPOCH_MS + at.microsecond // 1000
    notification = {"version": "1.0", "packageName": package, "eventTimeMillis": str(millis), **inner,
                    RECONCILED: {k: v for k, v in origin.items() if v is not None}}
    return json.dumps(notification, sort_keys=True, separators=(",", ":")).encode()
