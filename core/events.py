"""The canonical event: one store fact, as every adapter produces it and `POST /v1/events` accepts it.

Parsing is strict about what the contract requires and lenient about what it does not: unknown
fields stay in the raw payload, a missing or mistyped field is rejected with its name.

Limits (documented in the README, "The canonical event"), so that whatever is accepted can be
stored, hashed, folded and published without an error later on:

    id ≤ 200 characters; app_id ≤ 200; currency 3; country_code 2; every other text field ≤ 500
    text: valid Unicode (no lone surrogate) and no NUL, in every field and attribute
    times (occurred_at, expires_at, purchased_at): EARLIEST_TIME <= t < LATEST_TIME once converted to UTC
    attributes: nested at most MAX_ATTRIBUTES_DEPTH deep; keys ≤ 200, strings ≤ 10,000
    characters; numbers finite and within ±2^63 (see `core.safejson`)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, TypeVar

from subledger.core.errors import InvalidEvent
from subledger.core.safejson import find_problem, shown, text_problem


class EventType(StrEnum):
    PURCHASE = "purchase"
    RENEWAL = "renewal"
    AUTO_RENEW_DISABLED = "auto_renew_disabled"
    AUTO_RENEW_ENABLED = "auto_renew_enabled"
    BILLING_ISSUE = "billing_issue"
    BILLING_RECOVERED = "billing_recovered"
    EXPIRATION = "expiration"
    REFUND = "refund"
    REFUND_REVERSED = "refund_reversed"
    PRODUCT_CHANGE = "product_change"
    PAUSE_SCHEDULED = "pause_scheduled"
    PAUSED = "paused"
    RESUMED = "resumed"
    EXTENDED = "extended"
    ONE_TIME_PURCHASE = "one_time_purchase"


class Source(StrEnum):
    CUSTOM = "custom"
    APPLE = "apple"
    GOOGLE = "google"
    STRIPE = "stripe"
    REVENUECAT = "revenuecat"
    AMAZON = "amazon"
    SCHEDULER = "scheduler"


class Store(StrEnum):
    APP_STORE = "app_store"
    PLAY_STORE = "play_store"
    STRIPE = "stripe"
    AMAZON = "amazon"
    OTHER = "other"


class Environment(StrEnum):
    PRODUCTION = "production"
    SANDBOX = "sandbox"


class PeriodType(StrEnum):
    TRIAL = "trial"
    INTRO = "intro"
    NORMAL = "normal"
    PROMOTIONAL = "promotional"
    PREPAID = "prepaid"


class Reason(StrEnum):
    UNSUBSCRIBE = "unsubscribe"
    BILLING_ERROR = "billing_error"
    DEVELOPER_INITIATED = "developer_initiated"
    PRICE_INCREASE = "price_increase"
    CUSTOMER_SUPPORT = "customer_support"
    SUBSCRIPTION_PAUSED = "subscription_paused"
    UNKNOWN = "unknown"


DEFAULT_STORE: dict[Source, Store] = {
    Source.APPLE: Store.APP_STORE,
    Source.GOOGLE: Store.PLAY_STORE,
    Source.STRIPE: Store.STRIPE,
    Source.AMAZON: Store.AMAZON,
}

NEEDS_PRODUCT = frozenset({EventType.PURCHASE, EventType.RENEWAL, EventType.ONE_TIME_PURCHASE})
SIGNED_PRICE = frozenset({EventType.REFUND, EventType.REFUND_REVERSED})  # a refund's sign is ignored
MAX_ID_LENGTH = 200
# The instants a fact may name. Before 1970 no store sold a subscription; from 2200 on a date is a
# mistake or an attack, and the headroom keeps `expires_at + grace` far from datetime's year 9999.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=UTC)  # exclusive
TIME_RANGE = "out of range: times must lie in [1970-01-01T00:00:00Z, 2200-01-01T00:00:00Z) once in UTC"
MAX_ATTRIBUTES_DEPTH = 32
MAX_ATTRIBUTE_KEY = 200
MAX_ATTRIBUTE_TEXT = 10_000
E = TypeVar("E", bound=StrEnum)
_CURRENCY = re.compile(r"[A-Z]{3}")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


@dataclass(frozen=True, slots=True)
class CanonicalEvent:
    """A store fact. Frozen so the fold can never change what the log holds."""

    id: str
    source: Source
    app_id: str
    type: EventType
    occurred_at: datetime
    subscription_id: str | None
    app_user_id: str | None = None
    store: Store = Store.OTHER
    environment: Environment = Environment.PRODUCTION
    product_id: str | None = None
    new_product_id: str | None = None
    period_type: PeriodType = PeriodType.NORMAL
    price: Decimal | None = None
    currency: str | None = None
    expires_at: datetime | None = None
    transaction_id: str | None = None
    country_code: str | None = None
    reason: Reason | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    # What a store states beyond the lifecycle fact itself (README, "The canonical event"); each is
    # optional and left out of `to_facts` when absent, so facts written before they existed hash,
    # fold and render exactly as they did.
    refund_id: str | None = None
    purchased_at: datetime | None = None
    is_trial_conversion: bool | None = None
    takehome_percentage: Decimal | None = None
    aliases: tuple[str, ...] = ()

    @property
    def subscription_key(self) -> str:
        """The stream this fact belongs to; one-time purchases each get a stream of their own."""
        return subscription_key(self)

    @property
    def sort_key(self) -> tuple[datetime, str, str]:
        """Occurrence order; ties broken by (source, id) so arrival order never matters."""
        return (self.occurred_at, self.source, self.id)

    def to_facts(self) -> dict[str, Any]:
        """The canonical facts as JSON-ready data: what the log stores and hashes."""
        out: dict[str, Any] = {
            "id": self.id,
            "source": self.source,
            "app_id": self.app_id,
            "type": self.type,
            "occurred_at": format_time(self.occurred_at),
            "store": self.store,
            "environment": self.environment,
            "period_type": self.period_type,
        }
        optional: dict[str, Any] = {
            "subscription_id": self.subscription_id,
            "app_user_id": self.app_user_id,
            "product_id": self.product_id,
            "new_product_id": self.new_product_id,
            "price": None if self.price is None else str(self.price),
            "currency": self.currency,
            "expires_at": None if self.expires_at is None else format_time(self.expires_at),
            "transaction_id": self.transaction_id,
            "country_code": self.country_code,
            "reason": None if self.reason is None else self.reason,
            "refund_id": self.refund_id,
            "purchased_at": None if self.purchased_at is None else format_time(self.purchased_at),
            "is_trial_conversion": self.is_trial_conversion,
            "takehome_percentage": None if self.takehome_percentage is None else str(self.takehome_percentage),
            "aliases": list(self.aliases) if self.aliases else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.attributes:
            out["attributes"] = self.attributes
        return out


def stream_key(app_id: str, store: Store, subscription_id: str) -> str:
    """`app/store/subscription` names one stream across every source that reports on it."""
    return f"{app_id}/{store}/{subscription_id}"


def subscription_key(event: CanonicalEvent) -> str:
    """The event's stream; one-time purchases each get a stream of their own."""
    if event.subscription_id is not None:
        return stream_key(event.app_id, event.store, event.subscription_id)
    own = event.transaction_id or f"{event.source}:{event.id}"
    return stream_key(event.app_id, event.store, f"otp:{own}")


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with microseconds: stable bytes for hashing and sorting.

    `isoformat` always writes four year digits (`strftime("%Y")` does not below year 1000), so the
    text sorts like the instant it names and parses back.
    """
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"


def is_currency_code(code: str) -> bool:
    """ISO 4217's shape, three capital letters: the one test for facts, adapters and settings."""
    return _CURRENCY.fullmatch(code) is not None


def in_time_range(value: datetime, name: str) -> datetime:
    """`value` when it lies in [EARLIEST_TIME, LATEST_TIME), else InvalidEvent naming the field."""
    if not EARLIEST_TIME <= value < LATEST_TIME:
        raise InvalidEvent(TIME_RANGE, name)
    return value


def parse_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidEvent("must be an RFC 3339 time string", name)
    if len(value) > 64:
        raise InvalidEvent(f"not an RFC 3339 time: {shown(value, 40)!r}", name)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidEvent(f"not an RFC 3339 time: {shown(value)!r}", name) from None
    if parsed.tzinfo is None:
        raise InvalidEvent(f"time has no UTC offset: {shown(value)!r}", name)
    try:
        utc = parsed.astimezone(UTC)  # `0001-01-01T00:00:00+14:00` is before year 1 in UTC
    except (OverflowError, ValueError):
        utc = None
    if utc is None:
        raise InvalidEvent(TIME_RANGE, name)
    return in_time_range(utc, name)


def _text(obj: dict[str, Any], name: str, *, required: bool = False, limit: int = 500) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidEvent("is required", name)
        return None
    if not isinstance(value, str):
        raise InvalidEvent(f"must be a string, got {type(value).__name__}", name)
    if required and not value.strip():
        raise InvalidEvent("must not be empty", name)
    if len(value) > limit:
        raise InvalidEvent(f"longer than {limit} characters", name)
    problem = text_problem(value)
    if problem is not None:
        raise InvalidEvent(problem, name)
    return value


def _enum(obj: dict[str, Any], name: str, enum: type[E], default: E | None) -> E | None:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidEvent(f"must be a string, got {type(value).__name__}", name)
    try:
        return enum(value.lower())
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise InvalidEvent(f"unknown value {shown(value, 40)!r}; expected one of: {allowed}", name) from None


def _price(obj: dict[str, Any]) -> Decimal | None:
    value = obj.get("price")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidEvent(f"must be a decimal number or string, got {type(value).__name__}", "price")
    if isinstance(value, str) and len(value) > 40:
        raise InvalidEvent(f"not a decimal number: {shown(value, 40)!r}", "price")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise InvalidEvent(f"not a decimal number: {shown(str(value), 40)!r}", "price") from None
    if not amount.is_finite() or abs(amount) >= Decimal("1e12"):
        raise InvalidEvent(f"not a finite amount below 10^12: {shown(str(value), 40)!r}", "price")
    return amount


MAX_ALIASES = 100


def _aliases(obj: dict[str, Any]) -> tuple[str, ...]:
    """Other app user ids of the same user: a list of non-empty strings, repeats dropped, order kept."""
    value = obj.get("aliases")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidEvent(f"must be a list of strings, got {type(value).__name__}", "aliases")
    if len(value) > MAX_ALIASES:
        raise InvalidEvent(f"more than {MAX_ALIASES} ids", "aliases")
    for index, item in enumerate(value):
        name = f"aliases[{index}]"
        if not isinstance(item, str) or not item.strip():
            raise InvalidEvent("must be a non-empty string", name)
        if len(item) > 500:
            raise InvalidEvent("longer than 500 characters", name)
        problem = text_problem(item)
        if problem is not None:
            raise InvalidEvent(problem, name)
    return tuple(dict.fromkeys(value))


def _takehome(obj: dict[str, Any]) -> Decimal | None:
    """A share of the price in [0, 1], as the source states it (RevenueCat's `takehome_percentage`)."""
    value = obj.get("takehome_percentage")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str) or len(str(value)) > 40:
        raise InvalidEvent("must be a decimal number between 0 and 1", "takehome_percentage")
    try:
        share = Decimal(str(value))
    except InvalidOperation:
        raise InvalidEvent(f"not a decimal number: {shown(str(value), 40)!r}", "takehome_percentage") from None
    if not share.is_finite() or not 0 <= share <= 1:
        raise InvalidEvent("must be a decimal number between 0 and 1", "takehome_percentage")
    return share


def parse_event(obj: Any, *, default_source: Source = Source.CUSTOM) -> CanonicalEvent:
    """Validate one canonical JSON object; raise `InvalidEvent` naming the first bad field."""
    if not isinstance(obj, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {type(obj).__name__}")
    event_id = _text(obj, "id", required=True, limit=MAX_ID_LENGTH)
    source = _enum(obj, "source", Source, default_source)
    app_id = _text(obj, "app_id", required=True, limit=200)
    event_type = _enum(obj, "type", EventType, None)
    if event_type is None:
        raise InvalidEvent("is required", "type")
    occurred_at = parse_time(obj.get("occurred_at"), "occurred_at") if "occurred_at" in obj else None
    if occurred_at is None:
        raise InvalidEvent("is required", "occurred_at")
    subscription = _text(obj, "subscription_id", limit=500)
    if subscription is not None and not subscription.strip():
        raise InvalidEvent("must not be empty", "subscription_id")
    if subscription is None and event_type is not EventType.ONE_TIME_PURCHASE:
        raise InvalidEvent("is required", "subscription_id")
    assert source is not None and event_id is not None and app_id is not None
    store = _enum(obj, "store", Store, DEFAULT_STORE.get(source, Store.OTHER))
    environment = _enum(obj, "environment", Environment, Environment.PRODUCTION)
    period_type = _enum(obj, "period_type", PeriodType, PeriodType.NORMAL)
    product_id = _text(obj, "product_id")
    if event_type in NEEDS_PRODUCT and product_id is None:
        raise InvalidEvent(f"is required for type {event_type.value}", "product_id")
    new_product_id = _text(obj, "new_product_id")
    if event_type is EventType.PRODUCT_CHANGE and new_product_id is None:
        raise InvalidEvent("is required for type product_change", "new_product_id")
    price = _price(obj)
    if price is not None and price < 0 and event_type not in SIGNED_PRICE:
        # only refunds carry negative revenue; a negative charge would read as one in Segment
        raise InvalidEvent(f"must not be negative for type {event_type.value}", "price")
    currency = _text(obj, "currency", limit=3)
    if currency is not None:
        currency = currency.upper()
        if not is_currency_code(currency):
            raise InvalidEvent(f"not an ISO 4217 code: {shown(str(obj.get('currency')))!r}", "currency")
    if price is not None and price != 0 and currency is None:
        raise InvalidEvent("is required when price is given", "currency")
    expires_at = parse_time(obj["expires_at"], "expires_at") if obj.get("expires_at") is not None else None
    country = _text(obj, "country_code", limit=2)
    if country is not None:
        country = country.upper()
        if not _COUNTRY.match(country):
            raise InvalidEvent(f"not an ISO 3166-1 alpha-2 code: {shown(str(obj.get('country_code')))!r}",
                               "country_code")
    attributes = obj.get("attributes", {})
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise InvalidEvent(f"must be an object, got {type(attributes).__name__}", "attributes")
    problem = find_problem(attributes, max_depth=MAX_ATTRIBUTES_DEPTH, max_text=MAX_ATTRIBUTE_TEXT,
                           max_key=MAX_ATTRIBUTE_KEY, path="attributes")
    if problem is not None:
        raise InvalidEvent(problem[1], problem[0])
    assert store is not None and environment is not None and period_type is not None
    return CanonicalEvent(
        id=event_id,
        source=source,
        app_id=app_id,
        type=event_type,
        occurred_at=occurred_at,
        subscription_id=subscription,
        app_user_id=_text(obj, "app_user_id"),
        store=store,
        environment=environment,
        product_id=product_id,
        new_product_id=new_product_id,
        period_type=period_type,
        price=price,
        currency=currency,
        expires_at=expires_at,
        transaction_id=_text(obj, "transaction_id"),
        country_code=country,
        reason=_enum(obj, "reason", Reason, None),
        attributes=attributes,
        refund_id=_text(obj, "refund_id"),
        purchased_at=parse_time(obj["purchased_at"], "purchased_at") if obj.get("purchased_at") is not None else None,
        is_trial_conversion=_flag(obj, "is_trial_conversion"),
        takehome_percentage=_takehome(obj),
        aliases=_aliases(obj),
    )


def _flag(obj: dict[str, Any], name: str) -> bool | None:
    value = obj.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise InvalidEvent(f"must be true or false, got {type(value).__name__}", name)


def event_from_facts(facts: dict[str, Any]) -> CanonicalEvent:
    """Rebuild an event from the facts the log stored (they were valid when written)."""
    return parse_event(facts, default_source=Source(facts.get("source", "custom")))
