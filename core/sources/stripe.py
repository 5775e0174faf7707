"""Stripe webhook events → canonical events.

Why this module looks the way it does:

* The `Stripe-Signature` HMAC is checked by the `stripe` library itself (`WebhookSignature`), over
  the raw bytes, against every configured endpoint secret (several during a secret roll) and every
  `v1` value in the header. The library's age check reads the wall clock, so it is switched off and
  the same rule (reject timestamps older than `tolerance`) is applied here with the `now` argument:
  `core` never reads a clock.
* Stripe renders an event at its `api_version`, and 2025-03-31 ("basil") moved the fields this
  mapping needs (invoice → subscription under `parent.subscription_details`, line prices under
  `lines.data[].pricing`). Each reader takes the shape `api_version` names first and falls back to
  the other, so an event with an unexpected version still maps when its fields are there.
* Money comes from what Stripe charged (`amount_paid`) or returned (each refund's `amount`), in minor
  units converted with the currency's exponent (zero- and three-decimal currencies included).
  `amount_refunded` is the charge's running total, so a refund without its own object is the growth
  of that total since `previous_attributes`: two partial refunds are two facts, never one of the sum.
* Facts only: a paid `subscription_cycle` invoice is a `renewal`; whether it converts a trial is the
  fold's decision from prior state. A paid first invoice is the `purchase`; a trialing subscription's
  creation is the trial `purchase` (its invoice is $0 and says nothing). Every charge carries the
  invoice id as `transaction_id`, so `invoice.paid` and `invoice.payment_succeeded` for the same
  invoice fold once.
* A refund is a charge, and a charge does not name its subscription. The payload alone cannot link
  it, and `core` does no I/O, so the caller may pass `subscription_for` (invoice or payment-intent
  id → subscription id, e.g. looked up in the log). Unlinked refunds are stored with zero events.
  Each refund fact names its refund (`refund_id`), so one refund told by `charge.refunded` and by
  `refund.created` folds once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import stripe as stripe_sdk

from subledger.core import events, safejson
from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, MalformedPayload
from subledger.core.events import (
    EventType,
    PeriodType,
    Reason,
    Source,
    Store,
    format_time,
)
from subledger.core.sources import Notification
from subledger.core.sources.payload import (
    as_dict,
    as_int,
    as_list,
    as_str,
    delivery_id,
    dig,
    fact_id,
    fact_value,
    unix_time,
)

BASIL = "2025-03-31"
DEFAULT_TOLERANCE = 300

# Stripe's currency exponents (docs.stripe.com/currencies): the rest use two decimals.
ZERO_DECIMAL = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
THREE_DECIMAL = frozenset(["BHD", "JOD", "KWD", "OMR", "TND"])

CANCELLATION_REASON = {
    "cancellation_requested": Reason.UNSUBSCRIBE,
    "payment_failed": Reason.BILLING_ERROR,
    "payment_disputed": Reason.CUSTOMER_SUPPORT,
}

SubscriptionLookup = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class StripeConfig:
    """One app's Stripe endpoint. `tolerance` is in seconds; 0 turns the age check off."""

    app_id: str
    endpoint_secrets: tuple[str, ...]
    metadata_key: str = "app_user_id"
    tolerance: int = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if isinstance(self.endpoint_secrets, str):
            object.__setattr__(self, "endpoint_secrets", (self.endpoint_secrets,))
        object.__setattr__(self, "endpoint_secrets", tuple(self.endpoint_secrets))
        if not self.app_id:
            raise ConfigError("stripe.app_id", "must not be empty")
        if not self.endpoint_secrets or any(not s.strip() for s in self.endpoint_secrets):
            raise ConfigError("stripe.endpoint_secrets", "at least one non-empty endpoint secret (whsec_…)")
        if self.tolerance < 0:
            raise ConfigError("stripe.tolerance", "must not be negative")
        if not self.metadata_key:
            raise ConfigError("stripe.metadata_key", "must not be empty")


def signature_header(body: bytes, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` value Stripe would send for `body`: what tests and tools sign with."""
    header: str = stripe_sdk.WebhookSignature.generate_signature_header(body.decode("utf-8"), secret, timestamp)
    return header


def verify_signature(body: bytes, header: str | None, config: StripeConfig, now: datetime) -> None:
    """Raise `BadSignature` unless some configured secret signed `body` recently enough."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPayload("body is not UTF-8") from None
    if not header:
        raise BadSignature("header is missing", "Stripe-Signature")
    for secret in config.endpoint_secrets:
        try:
            stripe_sdk.WebhookSignature.verify_header(text, header, secret, tolerance=None)
        except stripe_sdk.SignatureVerificationError:
            continue
        break
    else:
        raise BadSignature("no v1 signature matches an endpoint secret", "Stripe-Signature")
    if config.tolerance:
        timestamp = _header_timestamp(header)
        if timestamp < now.timestamp() - config.tolerance:
            raise BadSignature(
                f"timestamp {timestamp} is older than the {config.tolerance} s tolerance", "Stripe-Signature"
            )


def parse_webhook(
    body: bytes,
    signature: str | None,
    config: StripeConfig,
    now: datetime,
    *,
    subscription_for: SubscriptionLookup | None = None,
) -> Notification:
    """Verify `Stripe-Signature`, then map. Raises a PayloadRejected subclass for anything refused."""
    verify_signature(body, signature, config, now)
    return parse_unverified(body, config, subscription_for=subscription_for)


def parse_unverified(
    body: bytes, config: StripeConfig, *, subscription_for: SubscriptionLookup | None = None
) -> Notification:
    """Map an event body already authenticated (a stored raw body, a trusted import)."""
    event = safejson.loads(body)  # depth, numbers and text held to the limits; 400/422 naming the field
    return map_event(event, config, subscription_for=subscription_for)


def map_event(event: Any, config: StripeConfig, *, subscription_for: SubscriptionLookup | None = None) -> Notification:
    """One decoded Stripe event object → a Notification."""
    return _Mapping(event, config, subscription_for).notification()


def _header_timestamp(header: str) -> int:
    """`t` as the library reads it (first `t=` item); the library already parsed it successfully."""
    for item in header.split(","):
        key, _, value = item.partition("=")
        if key == "t":
            return int(value.split("=")[0])
    raise BadSignature("no timestamp", "Stripe-Signature")  # unreachable after a library success


# --- tolerant readers: hostile JSON must yield None, never an exception ----------------------


def _ref(value: Any) -> str | None:
    """A Stripe reference: an id string, or an expanded object carrying `id`."""
    return as_str(value) or as_str(as_dict(value).get("id"))


def _first(*values: str | None) -> str | None:
    return next((v for v in values if v), None)


def _maybe_time(value: Any) -> datetime | None:
    """An optional period end or trial end: anything but a valid UNIX-seconds time is None (not refused)."""
    try:
        return unix_time(value, "-", unit="seconds")
    except InvalidEvent:
        return None


def amount(minor: Any, currency: str | None, name: str) -> Decimal | None:
    """Stripe minor units → a decimal amount in the currency (JPY 500 → 500, USD 999 → 9.99)."""
    if minor is None:
        return None
    value = as_int(minor)
    if value is None:
        raise InvalidEvent("must be an integer amount in minor units", name)
    code = (currency or "").upper()
    exponent = 0 if code in ZERO_DECIMAL else 3 if code in THREE_DECIMAL else 2
    return Decimal(value).scaleb(-exponent) if exponent else Decimal(value)


def is_basil(api_version: Any) -> bool:
    """True when the event is rendered at 2025-03-31 (basil) or later."""
    text = as_str(api_version)
    return text is not None and text[:10] >= BASIL


# --- invoice and subscription readers (both API shapes) ----------------------------------------


def invoice_subscription(invoice: Mapping[str, Any], basil: bool) -> str | None:
    new = _ref(dig(invoice, "parent", "subscription_details", "subscription"))
    old = _ref(invoice.get("subscription"))
    return _first(new, old) if basil else _first(old, new)


def _line_subscription(line: Mapping[str, Any]) -> str | None:
    return _first(
        _ref(dig(line, "parent", "subscription_item_details", "subscription")),
        _ref(line.get("subscription")) if line.get("type") == "subscription" else None,
    )


def _line_price(line: Mapping[str, Any], basil: bool) -> str | None:
    new = _ref(dig(line, "pricing", "price_details", "price"))
    old = _first(_ref(line.get("price")), _ref(line.get("plan")))
    return _first(new, old) if basil else _first(old, new)


def _line_product(line: Mapping[str, Any]) -> str | None:
    return _first(
        _ref(dig(line, "pricing", "price_details", "product")),
        _ref(dig(line, "price", "product")),
        _ref(dig(line, "plan", "product")),
    )


def _line_is_proration(line: Mapping[str, Any]) -> bool:
    return bool(dig(line, "parent", "subscription_item_details", "proration") or line.get("proration"))


def _line_is_subscription(line: Mapping[str, Any]) -> bool:
    return line.get("type") == "subscription" or dig(line, "parent", "type") == "subscription_item_details"


def _invoice_lines(invoice: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [as_dict(x) for x in as_list(dig(invoice, "lines", "data")) if isinstance(x, dict)]


def _main_line(invoice: Mapping[str, Any]) -> dict[str, Any]:
    """The line that bills the subscription's period (not a proration), else the first line."""
    lines = _invoice_lines(invoice)
    for line in lines:
        if _line_is_subscription(line) and not _line_is_proration(line):
            return line
    return lines[0] if lines else {}


def _item_prices(subscription: Mapping[str, Any]) -> list[str]:
    prices = [_ref(as_dict(item).get("price")) for item in as_list(dig(subscription, "items", "data"))]
    found = [p for p in prices if p]
    if not found and _ref(subscription.get("plan")):
        found = [_ref(subscription.get("plan")) or ""]
    return sorted(found)


def _first_item(subscription: Mapping[str, Any]) -> dict[str, Any]:
    items = as_list(dig(subscription, "items", "data"))
    return as_dict(items[0]) if items else {}


def _refund_objects(value: Any) -> list[dict[str, Any]] | None:
    """An expanded `refunds` list (`{"object": "list", "data": [...]}`), oldest first; None when the
    charge does not carry one (the default since API 2022-11-15)."""
    data = as_dict(value).get("data")
    if not isinstance(data, list):
        return None
    refunds = [as_dict(r) for r in data if isinstance(r, dict)]
    return sorted(refunds, key=lambda r: (as_int(r.get("created")) or 0, _ref(r.get("id")) or ""))


def _refund_counts(refund: Mapping[str, Any]) -> bool:
    """Money was (or is being) returned: every refund status but `failed` and `canceled`."""
    return refund.get("status") not in ("failed", "canceled")


def _cancelling(obj: Mapping[str, Any]) -> bool:
    """Scheduled to end: cancel at period end, or a `cancel_at` date set."""
    return bool(obj.get("cancel_at_period_end")) or obj.get("cancel_at") is not None


# --- mapping ---------------------------------------------------------------------------------


class _Mapping:
    """The mapping of one event; one method per handled event type."""

    def __init__(self, event: Any, config: StripeConfig, subscription_for: SubscriptionLookup | None) -> None:
        if not isinstance(event, dict):
            raise MalformedPayload("a Stripe event must be a JSON object")
        if event.get("object") != "event":
            raise MalformedPayload("not a Stripe v1 event (object must be 'event')", "object")
        event_id = delivery_id(event.get("id"), "id")
        kind = event.get("type")
        if not isinstance(kind, str) or not kind:
            raise InvalidEvent("is required", "type")
        obj = dig(event, "data", "object")
        if not isinstance(obj, dict):
            raise MalformedPayload("is required and must be an object", "data.object")
        self.config = config
        self.event = event
        self.external_id = event_id
        self.kind = kind[:200]
        self.obj: dict[str, Any] = obj
        self.previous = as_dict(dig(event, "data", "previous_attributes"))
        self.created = unix_time(event.get("created"), "created", unit="seconds")
        self.basil = is_basil(event.get("api_version"))
        live = event.get("livemode")
        self.environment = "production" if live is True else "sandbox"
        self.lookup = subscription_for
        self.subscription_id: str | None = None
        self.app_user_id: str | None = None
        self.facts: list[dict[str, Any]] = []

    def notification(self) -> Notification:
        handler = self.HANDLERS.get(self.kind)
        if handler is not None:
            handler(self)
        else:
            self._locate()
        stored = stream_key(self.config.app_id, self.subscription_id) if self.subscription_id else None
        return Notification.from_facts(
            Source.STRIPE, self.external_id, self.config.app_id, self.kind, self.facts, stored_key=stored
        )

    def _locate(self) -> None:
        """For stored-only events: which subscription (if any) the raw entry belongs to."""
        if self.obj.get("object") == "subscription":
            self.subscription_id = _ref(self.obj.get("id"))
        elif self.obj.get("object") == "invoice":
            self.subscription_id = invoice_subscription(self.obj, self.basil)

    # -- subscriptions --

    def _subscription(self) -> dict[str, Any]:
        sub = self.obj
        self.subscription_id = _ref(sub.get("id"))
        if not self.subscription_id:
            raise InvalidEvent("is required", "data.object.id")
        self.app_user_id = _first(
            self._metadata_user(sub.get("metadata")),
            self._metadata_user(as_dict(sub.get("customer")).get("metadata")),
        )
        return sub

    def on_subscription_created(self) -> None:
        sub = self._subscription()
        if sub.get("status") != "trialing":
            return  # a paid start is stated by its first paid invoice, with the amount charged
        item = _first_item(sub)
        price = as_dict(item.get("price")) or as_dict(sub.get("plan"))
        currency = as_str(price.get("currency"))
        self._add(
            EventType.PURCHASE,
            product_id=_first(_ref(item.get("price")), _ref(sub.get("plan"))),
            period_type=PeriodType.TRIAL,
            price=Decimal(0) if currency else None,
            currency=currency,
            expires_at=_maybe_time(sub.get("trial_end")),
            attributes=self._product_attributes(_ref(price.get("product")), as_str(price.get("lookup_key"))),
        )

    def on_subscription_updated(self) -> None:
        sub = self._subscription()
        prev = self.previous
        if "items" in prev or "plan" in prev:
            before, after = set(_item_prices(prev)), set(_item_prices(sub))
            added, removed = sorted(after - before), sorted(before - after)
            if before and added:
                self._add(
                    EventType.PRODUCT_CHANGE,
                    product_id=removed[0] if removed else None,
                    new_product_id=added[0],
                    expires_at=self._period_end(sub),
                )
        if "cancel_at_period_end" in prev or "cancel_at" in prev:
            was = _cancelling({**sub, **{k: prev[k] for k in ("cancel_at_period_end", "cancel_at") if k in prev}})
            now = _cancelling(sub)
            if now and not was:
                reason = CANCELLATION_REASON.get(as_str(dig(sub, "cancellation_details", "reason")) or "")
                self._add(EventType.AUTO_RENEW_DISABLED, reason=reason, expires_at=self._period_end(sub))
            elif was and not now:
                self._add(EventType.AUTO_RENEW_ENABLED, expires_at=self._period_end(sub))

    def on_subscription_deleted(self) -> None:
        sub = self._subscription()
        reason = CANCELLATION_REASON.get(as_str(dig(sub, "cancellation_details", "reason")) or "")
        if reason is Reason.UNSUBSCRIBE and not _cancelling(sub):
            # Cancelled immediately: the customer's cancellation and the end are both facts.
            self._add(EventType.AUTO_RENEW_DISABLED, reason=reason)
        self._add(EventType.EXPIRATION, reason=reason or Reason.UNKNOWN)

    def on_subscription_paused(self) -> None:
        self._subscription()
        self._add(EventType.PAUSED)

    def on_subscription_resumed(self) -> None:
        sub = self._subscription()
        self._add(EventType.RESUMED, expires_at=self._period_end(sub))

    def _period_end(self, sub: Mapping[str, Any]) -> datetime | None:
        old = _maybe_time(sub.get("current_period_end"))
        new = _maybe_time(_first_item(sub).get("current_period_end"))
        return (new or old) if self.basil else (old or new)

    # -- invoices --

    def _invoice(self) -> dict[str, Any] | None:
        invoice = self.obj
        self.subscription_id = invoice_subscription(invoice, self.basil)
        if not self.subscription_id:
            for line in _invoice_lines(invoice):
                self.subscription_id = _line_subscription(line)
                if self.subscription_id:
                    break
        if not self.subscription_id:
            return None  # a one-off invoice: not a subscription fact
        # The subscription's metadata as the invoice snapshots it (basil: under parent), then the
        # subscription line's copy, then an expanded customer.
        new = self._metadata_user(dig(invoice, "parent", "subscription_details", "metadata"))
        old = self._metadata_user(dig(invoice, "subscription_details", "metadata"))
        self.app_user_id = _first(
            *((new, old) if self.basil else (old, new)),
            self._metadata_user(_main_line(invoice).get("metadata")),
            self._metadata_user(dig(invoice, "customer", "metadata")),
        )
        return invoice

    def on_invoice_paid(self) -> None:
        invoice = self._invoice()
        if invoice is None:
            return
        reason = invoice.get("billing_reason")
        paid = as_int(invoice.get("amount_paid")) or 0
        if reason == "subscription_create":
            if paid > 0:
                self._charge(invoice, EventType.PURCHASE)
        elif reason == "subscription_cycle":
            attempts = as_int(invoice.get("attempt_count")) or 0
            self._charge(invoice, EventType.BILLING_RECOVERED if attempts > 1 else EventType.RENEWAL)
        elif reason == "subscription_update" and paid > 0:
            lines = [line for line in _invoice_lines(invoice) if _line_is_subscription(line)]
            if lines and not any(_line_is_proration(line) for line in lines):
                self._charge(invoice, EventType.RENEWAL)  # a new full period (e.g. a trial ended early)

    def on_invoice_payment_failed(self) -> None:
        invoice = self._invoice()
        if invoice is None:
            return
        line = _main_line(invoice)
        self._add(
            EventType.BILLING_ISSUE,
            product_id=_line_price(line, self.basil),
            transaction_id=_ref(invoice.get("id")),
            attributes=self._invoice_attributes(invoice),
        )

    def _charge(self, invoice: Mapping[str, Any], kind: EventType) -> None:
        currency = as_str(invoice.get("currency"))
        line = _main_line(invoice)
        product = _line_price(line, self.basil)
        if not product:
            raise InvalidEvent("no subscription line names a price", "data.object.lines")
        self._add(
            kind,
            product_id=product,
            price=amount(invoice.get("amount_paid"), currency, "data.object.amount_paid"),
            currency=currency,
            expires_at=_maybe_time(dig(line, "period", "end")),
            transaction_id=_ref(invoice.get("id")),
            attributes={
                **self._invoice_attributes(invoice),
                **self._product_attributes(_line_product(line), None),
            },
        )

    def _invoice_attributes(self, invoice: Mapping[str, Any]) -> dict[str, Any]:
        pairs = {
            "stripe_invoice": _ref(invoice.get("id")),
            "billing_reason": as_str(invoice.get("billing_reason")),
            "stripe_payment_intent": _ref(invoice.get("payment_intent")),
            "stripe_charge": _ref(invoice.get("charge")),
        }
        return {k: v for k, v in pairs.items() if v}

    # -- refunds --

    def on_charge_refunded(self) -> None:
        """One `refund` fact per refund this event adds to the charge, each with its own amount and id.

        `amount_refunded` is the charge's running total, so it is never a refund's amount. When the
        endpoint expands `refunds`, each listed refund is stated by its own id and amount (those
        already in `previous_attributes` left out; a repeat of one stated before folds once, by its
        id). Otherwise the refund is the growth of the total since `previous_attributes`, named by the
        charge and the total it brought (`ch_…:<total in minor units>`), which grows with every refund.
        """
        charge = self.obj
        charge_id = _ref(charge.get("id"))
        if not self._link_refund(charge.get("invoice"), _ref(charge.get("payment_intent")), charge_id):
            return  # cannot be linked to a subscription from the payload: stored only
        self.app_user_id = _first(
            self._metadata_user(charge.get("metadata")),
            self._metadata_user(dig(charge, "customer", "metadata")),
        )
        currency = as_str(charge.get("currency"))
        listed = _refund_objects(charge.get("refunds"))
        if listed is not None:
            before = {_ref(r.get("id")) for r in _refund_objects(self.previous.get("refunds")) or []}
            for refund in listed:
                refund_id = _ref(refund.get("id"))
                if refund_id and refund_id not in before and _refund_counts(refund):
                    self._refund(charge, refund.get("amount"), as_str(refund.get("currency")) or currency, refund_id)
            return
        total = as_int(charge.get("amount_refunded"))
        if total is None:
            raise InvalidEvent("must be an integer amount in minor units", "data.object.amount_refunded")
        previous = as_int(self.previous.get("amount_refunded")) or 0
        if total - previous <= 0:
            return  # nothing newly refunded (e.g. an update of an earlier refund): stored only
        self._refund(charge, total - previous, currency, f"{charge_id or self.external_id}:{total}")

    def on_refund(self) -> None:
        """`refund.created`, `refund.updated`, `charge.refund.updated`: the refund object itself.

        Whichever of these and `charge.refunded` carries a refund first states it; the others are
        repeats of the same refund id. A failed or cancelled refund states nothing (Segment cannot
        take a message back, and no money was returned)."""
        refund = self.obj
        refund_id = _ref(refund.get("id"))
        if refund.get("object") != "refund" or not refund_id or not _refund_counts(refund):
            return
        charge = as_dict(refund.get("charge"))
        intent_id = _first(_ref(refund.get("payment_intent")), _ref(charge.get("payment_intent")))
        if not self._link_refund(charge.get("invoice"), intent_id, _ref(refund.get("charge"))):
            return
        self.app_user_id = _first(
            self._metadata_user(refund.get("metadata")),
            self._metadata_user(charge.get("metadata")),
            self._metadata_user(dig(charge, "customer", "metadata")),
        )
        source = {**charge, "id": _ref(refund.get("charge")), "payment_intent": intent_id}
        self._refund(source, refund.get("amount"), as_str(refund.get("currency")), refund_id)

    def _link_refund(self, invoice_ref: Any, intent_id: str | None, charge_id: str | None) -> str | None:
        """The subscription a refunded charge paid for: an expanded invoice names it, else the caller's
        lookup of the invoice, payment intent or charge id among the facts already logged."""
        subscription = invoice_subscription(invoice_ref, self.basil) if isinstance(invoice_ref, dict) else None
        if not subscription and self.lookup is not None:
            for ref in (_ref(invoice_ref), intent_id, charge_id):
                if ref and not subscription:
                    found = self.lookup(ref)
                    subscription = found if isinstance(found, str) and found else None
        self.subscription_id = subscription
        return subscription

    def _refund(self, charge: Mapping[str, Any], minor: Any, currency: str | None, refund_id: str) -> None:
        refunded = amount(minor, currency, "data.object.amount")
        charge_id = _ref(charge.get("id"))
        self._add(
            EventType.REFUND,
            price=None if refunded is None else -refunded,
            currency=currency if refunded is not None else None,
            transaction_id=_ref(charge.get("invoice")) or charge_id,
            refund_id=refund_id,
            attributes={
                k: v
                for k, v in {
                    "stripe_charge": charge_id,
                    "stripe_payment_intent": _ref(charge.get("payment_intent")),
                    "stripe_refund": refund_id if refund_id.startswith("re_") else None,
                }.items()
                if v
            },
        )

    HANDLERS: dict[str, Callable[[_Mapping], None]] = {
        "customer.subscription.created": on_subscription_created,
        "customer.subscription.updated": on_subscription_updated,
        "customer.subscription.deleted": on_subscription_deleted,
        "customer.subscription.paused": on_subscription_paused,
        "customer.subscription.resumed": on_subscription_resumed,
        "invoice.paid": on_invoice_paid,
        "invoice.payment_succeeded": on_invoice_paid,
        "invoice.payment_failed": on_invoice_payment_failed,
        "charge.refunded": on_charge_refunded,
        "refund.created": on_refund,
        "refund.updated": on_refund,
        "charge.refund.updated": on_refund,
    }

    # -- building blocks --

    def _metadata_user(self, metadata: Any) -> str | None:
        return as_str(as_dict(metadata).get(self.config.metadata_key))

    def _product_attributes(self, product: str | None, lookup_key: str | None) -> dict[str, Any]:
        return {k: v for k, v in {"stripe_product": product, "stripe_lookup_key": lookup_key}.items() if v}

    def _add(self, kind: EventType, **fields: Any) -> None:
        index = len(self.facts)
        facts: dict[str, Any] = {
            "id": fact_id(self.external_id, index),
            "source": Source.STRIPE.value,
            "app_id": self.config.app_id,
            "type": kind.value,
            "occurred_at": format_time(self.created),
            "subscription_id": self.subscription_id,
            "store": Store.STRIPE.value,
            "environment": self.environment,
            "app_user_id": self.app_user_id,
        }
        attributes = {"stripe_event": self.kind, **fields.pop("attributes", {})}
        facts.update((name, fact_value(value)) for name, value in fields.items())
        facts["attributes"] = attributes
        self.facts.append({k: v for k, v in facts.items() if v is not None})


def stream_key(app_id: str, subscription_id: str) -> str:
    """The subscription key a Stripe subscription's events get (for stored-only events)."""
    return events.stream_key(app_id, Store.STRIPE, subscription_id)



# -- reconciliation: what the events API lists is what a webhook carries ---------------------------


@dataclass(frozen=True, slots=True)
class EventsPage:
    """One page of `GET /v1/events`: the events (newest first, as Stripe lists them) and whether more follow."""

    events: tuple[dict[str, Any], ...]
    has_more: bool

    @property
    def last_id(self) -> str | None:
        """The `starting_after` of the next page."""
        return str(self.events[-1]["id"]) if self.events else None


def events_page(body: bytes) -> EventsPage:
    """Parse a list answer, held to the limits of a body we receive; each item must be an event with an id.

    Raises MalformedPayload / InvalidEvent naming the field when the answer is not a Stripe list.
    """
    decoded = safejson.loads(body)
    if not isinstance(decoded, dict) or not isinstance(decoded.get("data"), list):
        raise InvalidEvent("is not a Stripe list (no data array)", "data")
    events: list[dict[str, Any]] = []
    for index, event in enumerate(decoded["data"]):
        if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not event["id"] \
                or not isinstance(event.get("created"), int):
            raise InvalidEvent("is not an event (no id or created)", f"data[{index}]")
        events.append(event)
    return EventsPage(tuple(events), decoded.get("has_more") is True)


def recovered_body(event: Mapping[str, Any]) -> bytes:
    """The raw body logged for an event the API listed: the event object a webhook POSTs, as JSON.

    The same object, so `parse_unverified` maps it to the same Notification and the same external
    id (the event id) as its webhook: a recovered event whose webhook did arrive is a duplicate.
    """
    return orjson.dumps(event)
