"""RevenueCat webhooks → canonical events.

Why this module looks the way it does:

* RevenueCat signs nothing; its only authentication is a static `Authorization` header value set in
  the dashboard. It is compared in constant time (`hmac.compare_digest`) and is mandatory here: an
  unauthenticated ingest endpoint would let anyone write revenue into the log.
* RevenueCat already speaks in lifecycle terms, so the mapping is mostly one type to one fact. The
  fold decides trial conversion from prior state; RevenueCat's `is_trial_conversion` is stated on
  the fact too and decides only when subledger has no prior state (the trial began before the
  webhook pointed here).
* What RevenueCat knows beyond the fact is carried on it: `aliases` and `original_app_user_id` (the
  identify's `traits.aliases`, as RevenueCat's own Segment identify), `takehome_percentage` (used
  for revenue after commission instead of subledger's estimate), and on a refund the refunded
  purchase (`product_id`, `purchased_at_ms`, `period_type`).
* A refund (CANCELLATION with `CUSTOMER_SUPPORT` and a negative price) does not turn auto-renew off:
  RevenueCat says so itself ("refunds can be given without cancelling a subscription"); the
  EXPIRATION RevenueCat sends when access ends is the end.
* Prices are what the customer paid in their currency (`price_in_purchased_currency` + `currency`),
  like every other source; RevenueCat's USD `price` is kept as an attribute.
* `subscription_id` is the store's own id (`original_transaction_id`), so an App Store subscription
  reported both by Apple directly and through RevenueCat lands in the same stream.
* TRANSFER moves subscriptions between app user ids; it states no lifecycle fact, so it is stored
  with zero events and `transfer_links` exposes the ids for the caller to act on.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from subledger.core import safejson
from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, MalformedPayload
from subledger.core.events import (
    MAX_ALIASES,
    EventType,
    PeriodType,
    Reason,
    Source,
    Store,
    format_time,
)
from subledger.core.sources import Notification
from subledger.core.sources.payload import as_str, country_code, delivery_id, fact_id, unix_time, unix_time_or_none

STORES = {
    "APP_STORE": Store.APP_STORE,
    "MAC_APP_STORE": Store.APP_STORE,
    "PLAY_STORE": Store.PLAY_STORE,
    "STRIPE": Store.STRIPE,
    "AMAZON": Store.AMAZON,
}
PERIOD_TYPES = {
    "TRIAL": PeriodType.TRIAL,
    "INTRO": PeriodType.INTRO,
    "NORMAL": PeriodType.NORMAL,
    "PROMOTIONAL": PeriodType.PROMOTIONAL,
    "PREPAID": PeriodType.PREPAID,
}
REASONS = {
    "UNSUBSCRIBE": Reason.UNSUBSCRIBE,
    "BILLING_ERROR": Reason.BILLING_ERROR,
    "DEVELOPER_INITIATED": Reason.DEVELOPER_INITIATED,
    "PRICE_INCREASE": Reason.PRICE_INCREASE,
    "CUSTOMER_SUPPORT": Reason.CUSTOMER_SUPPORT,
    "SUBSCRIPTION_PAUSED": Reason.SUBSCRIPTION_PAUSED,
    "UNKNOWN": Reason.UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class RevenueCatConfig:
    """One RevenueCat project's webhook. `app_ids` maps RevenueCat `app_id`s to ours (else `app_id`)."""

    app_id: str
    authorization: str
    app_ids: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.app_id:
            raise ConfigError("revenuecat.app_id", "must not be empty")
        if not self.authorization or not self.authorization.strip():
            raise ConfigError("revenuecat.authorization", "set the Authorization value configured in RevenueCat")


@dataclass(frozen=True, slots=True)
class TransferLinks:
    """A TRANSFER: subscriptions moved from these app user ids to those."""

    event_id: str
    transferred_from: tuple[str, ...]
    transferred_to: tuple[str, ...]
    occurred_at: datetime

    @property
    def receiver(self) -> str | None:
        """The user the subscriptions move to: the first id that is not RevenueCat-anonymous, else the first."""
        named = [i for i in self.transferred_to if not i.startswith("$RCAnonymousID:")]
        return next(iter(named or self.transferred_to), None)


def check_authorization(header: str | None, config: RevenueCatConfig) -> None:
    """Raise `BadSignature` unless `header` equals the configured value (constant time)."""
    if header is None or header == "":
        raise BadSignature("header is missing", "Authorization")
    if not hmac.compare_digest(header.encode("utf-8", "surrogatepass"), config.authorization.encode("utf-8")):
        raise BadSignature("does not match the configured value", "Authorization")


def parse_webhook(body: bytes, authorization: str | None, config: RevenueCatConfig) -> Notification:
    """Authenticate, then map. Raises a PayloadRejected subclass for anything refused."""
    check_authorization(authorization, config)
    return parse_unverified(body, config)


def parse_unverified(body: bytes, config: RevenueCatConfig) -> Notification:
    """Map a body already authenticated (a stored raw body, a trusted import)."""
    return _Mapping(_event(body), config).notification()


def transfer_links(body: bytes) -> TransferLinks | None:
    """The ids a TRANSFER body links; None for any other event. Call after `parse_webhook` accepted it."""
    event = _event(body)
    if event.get("type") != "TRANSFER":
        return None
    return TransferLinks(
        event_id=_event_id(event),
        transferred_from=_ids(event.get("transferred_from")),
        transferred_to=_ids(event.get("transferred_to")),
        occurred_at=_time(event.get("event_timestamp_ms"), "event_timestamp_ms"),
    )


def _event(body: bytes) -> dict[str, Any]:
    envelope = safejson.loads(body)  # depth, numbers and text held to the limits; 400/422 naming the field
    if not isinstance(envelope, dict):
        raise MalformedPayload("body must be a JSON object")
    event = envelope.get("event")
    if not isinstance(event, dict):
        raise MalformedPayload("is required and must be an object", "event")
    version = envelope.get("api_version")
    if version is not None and not isinstance(version, str):
        raise MalformedPayload("must be a string", "api_version")
    return event


def _event_id(event: Mapping[str, Any]) -> str:
    return delivery_id(event.get("id"), "event.id")


def _ids(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _time(value: Any, name: str) -> datetime:
    """An epoch-milliseconds field of the event; errors name it as sent (`event.<name>`)."""
    return unix_time(value, f"event.{name}")


def _maybe_time(value: Any, name: str) -> datetime | None:
    return unix_time_or_none(value, f"event.{name}")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def _number(value: Any, name: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidEvent("must be a number", f"event.{name}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise InvalidEvent(f"not a number: {value!r}", f"event.{name}") from None
    if not number.is_finite():
        raise InvalidEvent(f"not a finite number: {value!r}", f"event.{name}")
    return number


class _Mapping:
    """The mapping of one RevenueCat event; one method per handled type."""

    def __init__(self, event: dict[str, Any], config: RevenueCatConfig) -> None:
        self.event = event
        self.config = config
        self.external_id = _event_id(event)
        kind = event.get("type")
        if not isinstance(kind, str) or not kind:
            raise InvalidEvent("is required", "event.type")
        self.kind = kind[:200]
        rc_app = as_str(event.get("app_id"))
        self.app_id = config.app_ids.get(rc_app, config.app_id) if rc_app else config.app_id
        self.facts: list[dict[str, Any]] = []

    def notification(self) -> Notification:
        handler = self.HANDLERS.get(self.kind)
        if handler is not None:
            handler(self)
        return Notification.from_facts(Source.REVENUECAT, self.external_id, self.app_id, self.kind, self.facts)

    # -- handlers (named after RevenueCat's type) --

    def on_initial_purchase(self) -> None:
        self._add(EventType.PURCHASE, priced=True, at_purchase=True)

    def on_renewal(self) -> None:
        self._add(EventType.RENEWAL, priced=True, at_purchase=True)

    def on_cancellation(self) -> None:
        reason = REASONS.get(as_str(self.event.get("cancel_reason")) or "")
        paid = _number(self.event.get("price_in_purchased_currency"), "price_in_purchased_currency")
        usd = _number(self.event.get("price"), "price")
        if reason is Reason.CUSTOMER_SUPPORT and ((paid is not None and paid < 0) or (usd is not None and usd < 0)):
            self._add(EventType.REFUND, priced=True, reason=reason)
        else:
            self._add(EventType.AUTO_RENEW_DISABLED, reason=reason)

    def on_uncancellation(self) -> None:
        self._add(EventType.AUTO_RENEW_ENABLED)

    def on_non_renewing_purchase(self) -> None:
        self._add(EventType.ONE_TIME_PURCHASE, priced=True, at_purchase=True)

    def on_subscription_paused(self) -> None:
        self._add(EventType.PAUSE_SCHEDULED)

    def on_expiration(self) -> None:
        reason = REASONS.get(as_str(self.event.get("expiration_reason")) or "") or Reason.UNKNOWN
        self._add(EventType.EXPIRATION, reason=reason)

    def on_billing_issue(self) -> None:
        self._add(EventType.BILLING_ISSUE)

    def on_product_change(self) -> None:
        self._add(EventType.PRODUCT_CHANGE)

    def on_subscription_extended(self) -> None:
        self._add(EventType.EXTENDED)

    def on_refund_reversed(self) -> None:
        self._add(EventType.REFUND_REVERSED)

    def on_transfer(self) -> None:
        # No lifecycle fact; check now what `transfer_links` will need, so an accepted body always links.
        _time(self.event.get("event_timestamp_ms"), "event_timestamp_ms")

    HANDLERS: dict[str, Callable[[_Mapping], None]] = {
        "INITIAL_PURCHASE": on_initial_purchase,
        "RENEWAL": on_renewal,
        "CANCELLATION": on_cancellation,
        "UNCANCELLATION": on_uncancellation,
        "NON_RENEWING_PURCHASE": on_non_renewing_purchase,
        "SUBSCRIPTION_PAUSED": on_subscription_paused,
        "EXPIRATION": on_expiration,
        "BILLING_ISSUE": on_billing_issue,
        "PRODUCT_CHANGE": on_product_change,
        "SUBSCRIPTION_EXTENDED": on_subscription_extended,
        "REFUND_REVERSED": on_refund_reversed,
        "TRANSFER": on_transfer,
    }

    # -- building blocks --

    def _subscription_id(self) -> str:
        """The store's subscription id; RevenueCat-granted promotionals may have none, so name one."""
        event = self.event
        found = as_str(event.get("original_transaction_id")) or as_str(event.get("transaction_id"))
        if found is not None:
            return found
        user, product = as_str(event.get("app_user_id")), as_str(event.get("product_id"))
        if event.get("store") == "PROMOTIONAL" and user and product:
            return f"promotional:{user}:{product}"
        raise InvalidEvent(f"is required for {self.kind}", "event.original_transaction_id")

    def _add(
        self,
        kind: EventType,
        *,
        priced: bool = False,
        at_purchase: bool = False,
        reason: Reason | None = None,
    ) -> None:
        event = self.event
        subscription = None if kind is EventType.ONE_TIME_PURCHASE else self._subscription_id()
        # A charge happened at purchase time; any other fact when RevenueCat observed it.
        when = _maybe_time(event.get("purchased_at_ms"), "purchased_at_ms") if at_purchase else None
        when = when or _time(event.get("event_timestamp_ms"), "event_timestamp_ms")
        store = STORES.get(as_str(event.get("store")) or "", Store.OTHER)
        environment = "sandbox" if event.get("environment") == "SANDBOX" else "production"
        facts: dict[str, Any] = {
            "id": fact_id(self.external_id, len(self.facts)),
            "source": Source.REVENUECAT.value,
            "app_id": self.app_id,
            "type": kind.value,
            "occurred_at": format_time(when),
            "subscription_id": subscription,
            "app_user_id": as_str(event.get("app_user_id")) or as_str(event.get("original_app_user_id")),
            "store": store.value,
            "environment": environment,
            "product_id": as_str(event.get("product_id")),
            "transaction_id": as_str(event.get("transaction_id")),
            "country_code": country_code(event.get("country_code")),
            "reason": None if reason is None else reason.value,
        }
        period = PERIOD_TYPES.get(as_str(event.get("period_type")) or "")
        if period is not None:
            facts["period_type"] = period.value
        expires = _maybe_time(event.get("expiration_at_ms"), "expiration_at_ms")
        if expires is not None:
            facts["expires_at"] = format_time(expires)
        if kind is EventType.PRODUCT_CHANGE:
            facts["new_product_id"] = as_str(event.get("new_product_id"))
        if priced:
            paid = _number(event.get("price_in_purchased_currency"), "price_in_purchased_currency")
            if paid is not None:
                facts["price"] = str(paid)
                facts["currency"] = as_str(event.get("currency"))
        if kind is EventType.REFUND:
            facts["purchased_at"] = _iso(_maybe_time(event.get("purchased_at_ms"), "purchased_at_ms"))
        if kind in (EventType.RENEWAL, EventType.BILLING_RECOVERED):
            conversion = event.get("is_trial_conversion")
            facts["is_trial_conversion"] = conversion if isinstance(conversion, bool) else None
        if priced:
            facts["takehome_percentage"] = self._takehome()
        facts["aliases"] = self._aliases() or None
        facts["attributes"] = self._attributes()
        self.facts.append({k: v for k, v in facts.items() if v is not None})

    def _aliases(self) -> list[str]:
        """Every app user id RevenueCat lists for the user (`aliases`, then `original_app_user_id`),
        each once; ids the canonical event could not hold (empty, over 500 characters) are dropped."""
        event = self.event
        listed = event.get("aliases")
        ids = [i for i in listed if isinstance(i, str)] if isinstance(listed, list) else []
        original = as_str(event.get("original_app_user_id"))
        if original is not None:
            ids.append(original)
        return list(dict.fromkeys(i for i in ids if i.strip() and len(i) <= 500))[:MAX_ALIASES]

    def _takehome(self) -> str | None:
        """RevenueCat's `takehome_percentage` (a share, 0.7 = 70 %) when it is one; otherwise None (the
        destination's estimate applies), never a refusal: the figure is advisory."""
        try:
            share = _number(self.event.get("takehome_percentage"), "takehome_percentage")
        except InvalidEvent:
            return None
        return str(share) if share is not None and 0 <= share <= 1 else None

    def _attributes(self) -> dict[str, Any]:
        event = self.event
        pairs = {
            "revenuecat_type": self.kind,
            "revenuecat_store": as_str(event.get("store")),
            "revenuecat_app_id": as_str(event.get("app_id")),
            "is_trial_conversion": event.get("is_trial_conversion")
            if isinstance(event.get("is_trial_conversion"), bool)
            else None,
            "price_usd": str(p) if (p := _number(event.get("price"), "price")) is not None else None,
            "entitlement_ids": _ids(event.get("entitlement_ids")) or None,
            "offer_code": as_str(event.get("offer_code")),
            "presented_offering_id": as_str(event.get("presented_offering_id")),
            "renewal_number": event.get("renewal_number") if isinstance(event.get("renewal_number"), int) else None,
        }
        out = {k: v for k, v in pairs.items() if v is not None}
        if "entitlement_ids" in out:
            out["entitlement_ids"] = list(out["entitlement_ids"])
        return out
