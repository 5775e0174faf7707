"""Segment message rendering: a transition plus one destination's settings → the exact wire messages.

Rendered once, inside the ingest transaction, and stored in the outbox: the payload of a messageId
never changes afterwards, whatever the relay or a rebuild does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from typing import Any

from subledger.core.errors import MissingRate
from subledger.core.events import Environment, Store
from subledger.core.lifecycle import REVENUE_KINDS, Transition, TransitionKind

DEFAULT_EVENT_NAMES: Mapping[TransitionKind, str] = {
    kind: f"rc_{kind.value}_event" for kind in TransitionKind
}
LIBRARY_NAME = "subledger"
ONE_YEAR = timedelta(days=365)


class RevenueMode(StrEnum):
    GROSS = "gross"
    AFTER_COMMISSION = "after_commission"
    AFTER_COMMISSION_AND_TAX = "after_commission_and_tax"


@dataclass(frozen=True, slots=True)
class Commission:
    """Store commission rates (segment.md): App Store 30 % the first paid year then 15 %."""

    app_store_first_year: Decimal = Decimal("0.30")
    app_store_later: Decimal = Decimal("0.15")
    app_store_small_business: bool = False
    play_store: Decimal = Decimal("0.15")
    stripe: Decimal = Decimal("0")
    other: Decimal = Decimal("0")

    def rate(self, transition: Transition) -> Decimal:
        if transition.store is Store.APP_STORE:
            if self.app_store_small_business:
                return self.app_store_later
            since = transition.paid_since or transition.occurred_at
            first_year = transition.occurred_at - since < ONE_YEAR
            return self.app_store_first_year if first_year else self.app_store_later
        if transition.store is Store.PLAY_STORE:
            return self.play_store
        if transition.store is Store.STRIPE:
            return self.stripe
        return self.other


@dataclass(frozen=True, slots=True)
class Destination:
    """One Segment-compatible destination of one app, as the outbox writer needs it."""

    name: str
    app_id: str
    event_names: Mapping[TransitionKind, str] = field(default_factory=lambda: dict(DEFAULT_EVENT_NAMES))
    revenue_mode: RevenueMode = RevenueMode.GROSS
    commission: Commission = field(default_factory=Commission)
    tax_rates: Mapping[str, Decimal] = field(default_factory=dict)
    default_tax_rate: Decimal = Decimal("0")
    currency: str | None = None
    rates: Mapping[str, Decimal] = field(default_factory=dict)
    send_sandbox: bool = False
    publish_historical: bool = False
    library_version: str = "0"

    def event_name(self, kind: TransitionKind) -> str:
        return self.event_names.get(kind, DEFAULT_EVENT_NAMES[kind])

    def accepts(self, transition: Transition, *, historical: bool) -> bool:
        """Whether this destination gets a message at all for the transition."""
        if not self.event_name(transition.kind):
            return False
        if transition.environment is Environment.SANDBOX and not self.send_sandbox:
            return False
        return not (historical and not self.publish_historical)


def message_id_base(transition_id: str, destination: str) -> str:
    """≤ 64 chars of [A-Za-z0-9._-], the same for every retry, relay and rebuild."""
    return "sl-" + hashlib.sha256(f"{transition_id}\x1f{destination}".encode()).hexdigest()[:40]


def iso_millis(value: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and `Z`, whatever offset the datetime carries."""
    if value.tzinfo is UTC:  # the usual case: drop the "+00:00" instead of making a naive copy
        return value.isoformat(timespec="milliseconds")[:-6] + "Z"
    utc = value.astimezone(UTC) if value.tzinfo is not None else value
    return utc.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


_CENT_HUNDREDTH = Decimal("0.0001")
_MONEY: dict[Decimal, float] = {}


def _money(amount: Decimal) -> float:
    """Four decimals, half to even. Prices repeat (a catalogue of a few), so the result is remembered
    per value (equal Decimals round alike, whatever their exponent)."""
    money = _MONEY.get(amount)
    if money is None:
        if len(_MONEY) >= 4096:
            _MONEY.clear()
        money = _MONEY[amount] = float(amount.quantize(_CENT_HUNDREDTH, rounding=ROUND_HALF_EVEN).normalize())
    return money


def _convert(amount: Decimal, currency: str, dest: Destination) -> tuple[Decimal, str]:
    if dest.currency is None or dest.currency == currency:
        return amount, currency
    rate = dest.rates.get(currency)
    if rate is None:
        raise MissingRate(f"no rate from {currency} to {dest.currency}")
    return amount * rate, dest.currency


def takehome_share(transition: Transition, dest: Destination, mode: RevenueMode | None = None) -> Decimal:
    """The share of the gross price that `mode` (by default the destination's revenue mode) reports.

    After commission, the source's own figure wins when it states one (RevenueCat's
    `takehome_percentage`, "after commissions, before VAT and DST"): it knows the store's real rate
    for this purchase, subledger only the configured estimate. Tax is stripped the same way either way.
    """
    mode = mode or dest.revenue_mode
    if mode is RevenueMode.GROSS:
        return Decimal(1)
    stated = transition.takehome_percentage
    share = stated if stated is not None else 1 - dest.commission.rate(transition)
    if mode is RevenueMode.AFTER_COMMISSION_AND_TAX:
        tax = dest.tax_rates.get(transition.country_code or "", dest.default_tax_rate)
        share = share / (1 + tax)  # store prices include VAT/GST; strip it before the store's cut
    return share


def _properties(transition: Transition, dest: Destination) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if transition.price is not None and transition.currency is not None:
        has_revenue = transition.kind in REVENUE_KINDS or transition.price < 0
        share = takehome_share(transition, dest)
        gross, currency = _convert(transition.price, transition.currency, dest)
        if has_revenue:
            props["revenue"] = _money(gross * share)
            props["currency"] = currency
            # what the developer keeps after the store's cut and tax, as RevenueCat reports it, whatever
            # the revenue mode (a gross destination must not claim that nothing is taken)
            props["takehome_percentage"] = _money(
                takehome_share(transition, dest, RevenueMode.AFTER_COMMISSION_AND_TAX)
            )
            props["commission_source"] = "estimate" if transition.takehome_percentage is None else "source"
        props["price"] = _money(gross)
        props["price_in_purchased_currency"] = _money(transition.price)
        props["purchased_currency"] = transition.currency
    # The optional properties, each only when the transition states it (in this order); one `if` a
    # property: this runs twice per message (track and every destination), on the import's hot path.
    t = transition
    if t.product_id is not None:
        props["product_id"] = t.product_id
    if t.new_product_id is not None:
        props["new_product_id"] = t.new_product_id
    if t.period_type is not None:
        props["period_type"] = t.period_type.upper()
    props["store"] = t.store.upper()
    props["environment"] = t.environment.upper()
    if t.transaction_id is not None:
        props["transaction_id"] = t.transaction_id
    if t.subscription_id is not None:
        props["original_transaction_id"] = t.subscription_id
    props["app_id"] = t.app_id
    if t.app_user_id is not None:
        props["app_user_id"] = t.app_user_id
    if t.purchased_at is not None:
        props["purchased_at"] = int(t.purchased_at.timestamp())
    if t.expires_at is not None:
        props["expires_at"] = int(t.expires_at.timestamp())
    if t.country_code is not None:
        props["country_code"] = t.country_code
    if t.cancel_reason is not None:
        props["cancel_reason"] = t.cancel_reason.upper()
    if t.expiration_reason is not None:
        props["expiration_reason"] = t.expiration_reason.upper()
    if t.is_trial_conversion is not None:
        props["is_trial_conversion"] = t.is_trial_conversion
    if t.renewal_number is not None:
        props["renewal_number"] = t.renewal_number
    props["event_id"] = t.event_id
    return props


def render(
    transition: Transition, dest: Destination, *, aliases: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The `track` and `identify` of one transition for one destination, as Segment's wire format."""
    base = message_id_base(transition.id, dest.name)
    who: dict[str, Any] = (
        {"userId": transition.app_user_id}
        if transition.app_user_id
        else {"anonymousId": transition.subscriber}
    )
    context = {
        "environment": transition.environment,
        "library": {"name": LIBRARY_NAME, "version": dest.library_version},
    }
    timestamp = iso_millis(transition.occurred_at)
    track = {
        "type": "track",
        "messageId": base + ".t",
        **who,
        "event": dest.event_name(transition.kind),
        "timestamp": timestamp,
        "properties": _properties(transition, dest),
        "context": context,
    }
    traits: dict[str, Any] = {}
    if transition.status is not None:
        traits["subscription_status"] = transition.status
    if transition.app_user_id:
        traits["last_seen_app_user_id"] = transition.app_user_id
    # The ids the source knows the user by (RevenueCat's `aliases`, `original_app_user_id`), then
    # those an identity link adds; each once, in that order.
    known = list(dict.fromkeys((*(transition.aliases or ()), *aliases)))
    if known:
        traits["aliases"] = known
    identify = {
        "type": "identify",
        "messageId": base + ".i",
        **who,
        "traits": traits,
        "timestamp": timestamp,
        "context": context,
    }
    return [track, identify]
