"""The subscription lifecycle state machine: a pure fold of canonical events into state and transitions.

Rules (lifecycle.md): the log is the truth and the state is a fold of it in occurrence order;
a transition's id depends only on (subscription, causing event, kind); exactly one transition per
lifecycle fact; a fact that changes nothing yields nothing. Every business rule of the lifecycle
lives in `step`, one branch per event type.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from subledger.core.events import (
    CanonicalEvent,
    Environment,
    EventType,
    PeriodType,
    Reason,
    Source,
    Store,
    format_time,
    parse_time,
)


class TransitionKind(StrEnum):
    INITIAL_PURCHASE = "initial_purchase"
    TRIAL_STARTED = "trial_started"
    TRIAL_CONVERTED = "trial_converted"
    TRIAL_CANCELLED = "trial_cancelled"
    RENEWAL = "renewal"
    CANCELLATION = "cancellation"
    UNCANCELLATION = "uncancellation"
    NON_SUBSCRIPTION_PURCHASE = "non_subscription_purchase"
    SUBSCRIPTION_PAUSED = "subscription_paused"
    EXPIRATION = "expiration"
    BILLING_ISSUE = "billing_issue"
    PRODUCT_CHANGE = "product_change"


REVENUE_KINDS = frozenset(
    {
        TransitionKind.INITIAL_PURCHASE,
        TransitionKind.TRIAL_CONVERTED,
        TransitionKind.RENEWAL,
        TransitionKind.NON_SUBSCRIPTION_PURCHASE,
    }
)


class Status(StrEnum):
    """RevenueCat's `rc_subscription_status` values, sent as the `subscription_status` trait."""

    TRIAL = "trial"
    INTRO = "intro"
    ACTIVE = "active"
    CANCELLED_TRIAL = "cancelled_trial"
    CANCELLED = "cancelled"
    GRACE_PERIOD_TRIAL = "grace_period_trial"
    GRACE_PERIOD = "grace_period"
    PAUSED = "paused"
    EXPIRED = "expired"
    PROMOTIONAL = "promotional"
    EXPIRED_PROMOTIONAL = "expired_promotional"


RECENT_TRANSACTIONS = 32
SortKey = tuple[str, str, str]


def sort_key(event: CanonicalEvent) -> SortKey:
    """Occurrence order as comparable strings, so a stored state can say where it stands."""
    return (format_time(event.occurred_at), event.source, event.id)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _shallow(obj: Any) -> dict[str, Any]:
    """Field values without `asdict`'s deep copy: these dataclasses hold only immutable values."""
    names = _FIELD_NAMES.get(type(obj))
    if names is None:
        names = _FIELD_NAMES[type(obj)] = tuple(f.name for f in fields(obj))
    return {name: getattr(obj, name) for name in names}


def transition_id(subscription: str, source: str, event_id: str, kind: str) -> str:
    """Rule 2: a pure function of (subscription, causing event, kind); a re-fold finds the same id."""
    digest = hashlib.sha256(f"{subscription}\x1f{source}\x1f{event_id}\x1f{kind}".encode()).hexdigest()
    return "tr_" + digest[:32]


ANONYMOUS_PREFIX = "anon:"


def anonymous_id(subscription_key: str) -> str:
    """The stable anonymous id of a subscription whose app user is not known (yet): `anon:<key>`."""
    return ANONYMOUS_PREFIX + subscription_key


def subscriber_id(app_user_id: str | None, subscription_key: str) -> str:
    """Who Segment attributes a subscription's messages to: the app user, else its anonymous id.

    The one statement of the rule: transitions, identity links, verification and audit lookups all
    name a subscriber this way, so a message, its audit trail and a re-fold agree on who it was."""
    return app_user_id if app_user_id else anonymous_id(subscription_key)


def anonymous_key(subscriber: str) -> str | None:
    """The subscription key an `anon:<key>` subscriber names; None for any other name."""
    return subscriber[len(ANONYMOUS_PREFIX):] if subscriber.startswith(ANONYMOUS_PREFIX) else None


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """The projection of one subscription. Status is derived, so it can never disagree with the flags."""

    key: str
    app_id: str
    store: Store
    subscription_id: str | None
    started: bool = False
    expired: bool = False
    auto_renew: bool = True
    billing_issue: bool = False
    paused: bool = False
    pause_pending: bool = False
    period_type: PeriodType | None = None
    product_id: str | None = None
    app_user_id: str | None = None
    environment: Environment = Environment.PRODUCTION
    country_code: str | None = None
    expires_at: datetime | None = None
    purchased_at: datetime | None = None
    paid_since: datetime | None = None
    renewal_number: int = 0
    last_price: Decimal | None = None
    last_currency: str | None = None
    transactions: tuple[str, ...] = ()
    refunds: tuple[str, ...] = ()
    last_event: SortKey | None = None
    events_applied: int = 0

    @classmethod
    def empty(cls, event: CanonicalEvent) -> SubscriptionState:
        return cls(
            key=event.subscription_key,
            app_id=event.app_id,
            store=event.store,
            subscription_id=event.subscription_id,
        )

    @property
    def status(self) -> Status | None:
        """None until a subscription period started: a stream of one-time purchases has no status."""
        if not self.started or self.period_type is None:
            return None
        trial = self.period_type is PeriodType.TRIAL
        if self.expired:
            promotional = self.period_type is PeriodType.PROMOTIONAL
            return Status.EXPIRED_PROMOTIONAL if promotional else Status.EXPIRED
        if self.paused:
            return Status.PAUSED
        if self.billing_issue:
            return Status.GRACE_PERIOD_TRIAL if trial else Status.GRACE_PERIOD
        if not self.auto_renew:
            return Status.CANCELLED_TRIAL if trial else Status.CANCELLED
        return {
            PeriodType.TRIAL: Status.TRIAL,
            PeriodType.INTRO: Status.INTRO,
            PeriodType.PROMOTIONAL: Status.PROMOTIONAL,
        }.get(self.period_type or PeriodType.NORMAL, Status.ACTIVE)

    @property
    def live(self) -> bool:
        return self.started and not self.expired

    def to_json(self) -> dict[str, Any]:
        out = _shallow(self)
        for name in ("expires_at", "purchased_at", "paid_since"):
            out[name] = None if out[name] is None else format_time(out[name])
        out["last_price"] = None if self.last_price is None else str(self.last_price)
        out["transactions"] = list(self.transactions)
        out["refunds"] = list(self.refunds)
        out["last_event"] = None if self.last_event is None else list(self.last_event)
        out["status"] = None if self.status is None else self.status
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SubscriptionState:
        def time(name: str) -> datetime | None:
            value = data.get(name)
            return None if value is None else parse_time(value, name)

        last = data.get("last_event")
        return cls(
            key=data["key"],
            app_id=data["app_id"],
            store=Store(data["store"]),
            subscription_id=data.get("subscription_id"),
            started=bool(data["started"]),
            expired=bool(data["expired"]),
            auto_renew=bool(data["auto_renew"]),
            billing_issue=bool(data["billing_issue"]),
            paused=bool(data["paused"]),
            pause_pending=bool(data["pause_pending"]),
            period_type=None if data.get("period_type") is None else PeriodType(data["period_type"]),
            product_id=data.get("product_id"),
            app_user_id=data.get("app_user_id"),
            environment=Environment(data["environment"]),
            country_code=data.get("country_code"),
            expires_at=time("expires_at"),
            purchased_at=time("purchased_at"),
            paid_since=time("paid_since"),
            renewal_number=int(data["renewal_number"]),
            last_price=None if data.get("last_price") is None else Decimal(data["last_price"]),
            last_currency=data.get("last_currency"),
            transactions=tuple(data.get("transactions", ())),
            refunds=tuple(data.get("refunds", ())),
            last_event=None if last is None else (last[0], last[1], last[2]),
            events_applied=int(data["events_applied"]),
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """One lifecycle fact worth telling Segment about, with everything rendering needs."""

    id: str
    kind: TransitionKind
    subscription_key: str
    app_id: str
    store: Store
    environment: Environment
    event_source: str
    event_id: str
    occurred_at: datetime
    status: Status | None
    app_user_id: str | None = None
    subscription_id: str | None = None
    product_id: str | None = None
    new_product_id: str | None = None
    period_type: PeriodType | None = None
    price: Decimal | None = None
    currency: str | None = None
    expires_at: datetime | None = None
    purchased_at: datetime | None = None
    paid_since: datetime | None = None
    transaction_id: str | None = None
    country_code: str | None = None
    cancel_reason: Reason | None = None
    expiration_reason: Reason | None = None
    is_trial_conversion: bool | None = None
    renewal_number: int | None = None
    takehome_percentage: Decimal | None = None  # the source's own share after commission, when stated
    aliases: tuple[str, ...] | None = None  # other app user ids the source names for this user

    @property
    def subscriber(self) -> str:
        """Who Segment attributes this to: the app user, else a stable anonymous id."""
        return subscriber_id(self.app_user_id, self.subscription_key)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready; enum members stay as they are (they are `str`), None values are left out."""
        out: dict[str, Any] = {}
        for name, value in _shallow(self).items():
            if value is None:
                continue
            kind = value.__class__
            if kind is datetime:
                value = format_time(value)
            elif kind is Decimal:
                value = str(value)
            elif kind is tuple:
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Transition:
        def time(name: str) -> datetime | None:
            value = data.get(name)
            return None if value is None else parse_time(value, name)

        def opt(name: str, conv: Any) -> Any:
            value = data.get(name)
            return None if value is None else conv(value)

        return cls(
            id=data["id"],
            kind=TransitionKind(data["kind"]),
            subscription_key=data["subscription_key"],
            app_id=data["app_id"],
            store=Store(data["store"]),
            environment=Environment(data["environment"]),
            event_source=data["event_source"],
            event_id=data["event_id"],
            occurred_at=parse_time(data["occurred_at"], "occurred_at"),
            status=opt("status", Status),
            app_user_id=data.get("app_user_id"),
            subscription_id=data.get("subscription_id"),
            product_id=data.get("product_id"),
            new_product_id=data.get("new_product_id"),
            period_type=opt("period_type", PeriodType),
            price=opt("price", Decimal),
            currency=data.get("currency"),
            expires_at=time("expires_at"),
            purchased_at=time("purchased_at"),
            paid_since=time("paid_since"),
            transaction_id=data.get("transaction_id"),
            country_code=data.get("country_code"),
            cancel_reason=opt("cancel_reason", Reason),
            expiration_reason=opt("expiration_reason", Reason),
            is_trial_conversion=data.get("is_trial_conversion"),
            renewal_number=data.get("renewal_number"),
            takehome_percentage=opt("takehome_percentage", Decimal),
            aliases=opt("aliases", tuple),
        )


@dataclass(frozen=True, slots=True)
class Fold:
    state: SubscriptionState
    transitions: tuple[Transition, ...] = field(default_factory=tuple)


def _remember(seen: tuple[str, ...], txn: str | None) -> tuple[str, ...]:
    if txn is None or txn in seen:
        return seen
    return (*seen, txn)[-RECENT_TRANSACTIONS:]


def _charge(state: SubscriptionState, event: CanonicalEvent) -> dict[str, Any]:
    """The changes every charged period makes the same way."""
    price = event.price if event.price is not None else state.last_price
    currency = event.currency if event.currency is not None else state.last_currency
    paid = event.price is not None and event.price > 0
    return {
        "started": True,
        "expired": False,
        "auto_renew": True,
        "billing_issue": False,
        "paused": False,
        "pause_pending": False,
        "product_id": event.product_id or state.product_id,
        "expires_at": event.expires_at or state.expires_at,
        "purchased_at": event.occurred_at,
        "paid_since": state.paid_since or (event.occurred_at if paid else None),
        "last_price": price,
        "last_currency": currency,
        "transactions": _remember(state.transactions, event.transaction_id),
    }


def _stale_inference(state: SubscriptionState, event: CanonicalEvent) -> bool:
    """A scheduler-inferred expiration closes the period ending at its `expires_at` (rule 6).

    When the log holds a charge or extension that moved the period end past it (a renewal that
    arrived after the inference but happened before it), the inference was wrong: it is a no-op.
    """
    return (
        event.source is Source.SCHEDULER
        and event.expires_at is not None
        and state.expires_at is not None
        and state.expires_at > event.expires_at
    )


def step(state: SubscriptionState, event: CanonicalEvent) -> tuple[SubscriptionState, Transition | None]:
    """Apply one fact. Returns the new state and the one transition it derives, if any.

    Each branch only collects the fields it changes; the state is rebuilt once at the end.
    """
    changes: dict[str, Any] = {
        "app_user_id": event.app_user_id or state.app_user_id,
        "environment": event.environment,
        "country_code": event.country_code or state.country_code,
        "last_event": sort_key(event),
        "events_applied": state.events_applied + 1,
    }
    kind: TransitionKind | None = None
    extra: dict[str, Any] = {}
    t = EventType
    already_charged = event.transaction_id is not None and event.transaction_id in state.transactions

    if event.type is t.PURCHASE:
        if already_charged or state.live:
            changes["expires_at"] = event.expires_at or state.expires_at
        else:
            trial = event.period_type is PeriodType.TRIAL
            if trial:
                kind = TransitionKind.TRIAL_STARTED
            elif state.started:
                kind = TransitionKind.RENEWAL  # a resubscription after expiry
            else:
                kind = TransitionKind.INITIAL_PURCHASE
            renewals = state.renewal_number + (1 if kind is TransitionKind.RENEWAL else 0)
            changes.update(_charge(state, event), period_type=event.period_type, renewal_number=renewals)
            if kind is TransitionKind.RENEWAL:
                extra["renewal_number"] = renewals
    elif event.type in (t.RENEWAL, t.BILLING_RECOVERED):
        if not already_charged:
            # With prior state the fold decides; with none (the trial began before subledger heard of
            # the subscription) the source's own `is_trial_conversion` is all there is to go by.
            converting = (
                state.period_type is PeriodType.TRIAL if state.started else event.is_trial_conversion is True
            )
            kind = TransitionKind.TRIAL_CONVERTED if converting else TransitionKind.RENEWAL
            period = PeriodType.NORMAL if event.period_type is PeriodType.TRIAL else event.period_type
            renewals = state.renewal_number + 1
            changes.update(_charge(state, event), period_type=period, renewal_number=renewals)
            extra["renewal_number"] = renewals
            extra["is_trial_conversion"] = converting
    elif event.type is t.AUTO_RENEW_DISABLED:
        if state.live and state.auto_renew:
            trial = state.period_type is PeriodType.TRIAL
            kind = TransitionKind.TRIAL_CANCELLED if trial else TransitionKind.CANCELLATION
            extra["cancel_reason"] = event.reason or Reason.UNSUBSCRIBE
        changes["auto_renew"] = False
    elif event.type is t.AUTO_RENEW_ENABLED:
        if state.live and not state.auto_renew:
            kind = TransitionKind.UNCANCELLATION
        changes["auto_renew"] = True
    elif event.type is t.BILLING_ISSUE:
        if state.live and not state.billing_issue:
            kind = TransitionKind.BILLING_ISSUE
            changes["billing_issue"] = True
    elif event.type is t.EXPIRATION:
        if state.live and not _stale_inference(state, event):
            kind = TransitionKind.EXPIRATION
            extra["expiration_reason"] = event.reason or Reason.UNKNOWN
            changes.update(expired=True, billing_issue=False, paused=False, pause_pending=False)
    elif event.type is t.REFUND:
        # A refund is money back, not a lifecycle change: it is reported (RevenueCat's cancellation
        # with negative revenue) and changes nothing else. Whatever the store does to the
        # subscription besides, its adapter states as facts of their own (an Apple refund is also an
        # `expiration`; a Stripe refund leaves the subscription running).
        refund_key = refund_identity(event)
        if refund_key not in state.refunds:
            kind = TransitionKind.CANCELLATION
            charged = event.price if event.price is not None else state.last_price
            amount = None if charged is None else abs(charged)
            extra["cancel_reason"] = Reason.CUSTOMER_SUPPORT
            extra["price"] = None if amount is None else Decimal(0) - amount  # never a "-0"
            extra["currency"] = event.currency or state.last_currency
            # The refunded purchase as the fact names it, else the latest one the state knows.
            extra["product_id"] = event.product_id or state.product_id
            extra["purchased_at"] = event.purchased_at or state.purchased_at
            extra["period_type"] = state.period_type if state.started else event.period_type
            changes["refunds"] = _remember(state.refunds, refund_key)
    elif event.type is t.REFUND_REVERSED:
        pass  # recorded in the log; RevenueCat publishes nothing for it either
    elif event.type is t.PRODUCT_CHANGE:
        if event.new_product_id != state.product_id:
            if state.live:
                kind = TransitionKind.PRODUCT_CHANGE
                extra["new_product_id"] = event.new_product_id
            changes["product_id"] = event.new_product_id
    elif event.type in (t.PAUSE_SCHEDULED, t.PAUSED):
        now_paused = event.type is t.PAUSED
        if state.live and not (state.paused or state.pause_pending):
            kind = TransitionKind.SUBSCRIPTION_PAUSED
        if state.live:
            changes.update(paused=state.paused or now_paused, pause_pending=not now_paused)
    elif event.type is t.RESUMED:
        changes.update(paused=False, pause_pending=False)
    elif event.type is t.EXTENDED:
        changes["expires_at"] = event.expires_at or state.expires_at
    elif event.type is t.ONE_TIME_PURCHASE and not already_charged:
        kind = TransitionKind.NON_SUBSCRIPTION_PURCHASE
        changes.update(
            started=True,
            product_id=event.product_id,
            purchased_at=event.occurred_at,
            last_price=event.price,
            last_currency=event.currency,
            transactions=_remember(state.transactions, event.transaction_id),
        )
    new = replace(state, **changes)

    if kind is None:
        return new, None
    fields: dict[str, Any] = {
        "product_id": new.product_id if kind is not TransitionKind.PRODUCT_CHANGE else state.product_id,
        "period_type": new.period_type,
        "expires_at": new.expires_at,
        "purchased_at": new.purchased_at,
        "paid_since": new.paid_since,
        "transaction_id": event.transaction_id,
        "country_code": new.country_code,
    }
    if kind in REVENUE_KINDS:
        fields["price"] = event.price
        fields["currency"] = event.currency
    if kind in REVENUE_KINDS or event.type is t.REFUND:
        fields["takehome_percentage"] = event.takehome_percentage
    if event.aliases:
        fields["aliases"] = event.aliases
    fields.update(extra)
    # A refund may reach the log through several deliveries (Stripe's `charge.refunded` and
    # `refund.created` both carry it): when the fact names the refund, the refund is the cause, so
    # whichever delivery the fold meets first the transition keeps its id.
    cause = f"refund:{event.refund_id}" if event.type is t.REFUND and event.refund_id else event.id
    transition = Transition(
        id=transition_id(state.key, event.source, cause, kind),
        kind=kind,
        subscription_key=state.key,
        app_id=state.app_id,
        store=state.store,
        environment=event.environment,
        event_source=event.source,
        event_id=event.id,
        occurred_at=event.occurred_at,
        status=new.status,
        app_user_id=new.app_user_id,
        subscription_id=state.subscription_id,
        **fields,
    )
    return new, transition


def refund_identity(event: CanonicalEvent) -> str:
    """What makes two refund facts the same refund: the store's refund id, else the refunded
    transaction (Apple, Google, RevenueCat refund a whole transaction once), else the fact itself."""
    return event.refund_id or event.transaction_id or f"{event.source}:{event.id}"


def ordered(events: Iterable[CanonicalEvent]) -> list[CanonicalEvent]:
    """Occurrence order with repeats of one (source, id) dropped: arrival order cannot matter.

    Like the log (rule 4), the first delivery of a (source, id) is the one that counts.
    """
    unique: dict[tuple[str, str], CanonicalEvent] = {}
    for event in events:
        unique.setdefault((event.source, event.id), event)
    return sorted(unique.values(), key=sort_key)


def advance(state: SubscriptionState, events: Iterable[CanonicalEvent]) -> Fold:
    """Apply events that all sort after `state.last_event` (the cheap, usual path)."""
    transitions: list[Transition] = []
    for event in ordered(events):
        state, transition = step(state, event)
        if transition is not None:
            transitions.append(transition)
    return Fold(state, tuple(transitions))


def fold(events: Sequence[CanonicalEvent]) -> Fold:
    """Rule 1: the state of a subscription is this fold of its whole history."""
    if not events:
        raise ValueError("fold needs at least one event")
    return advance(SubscriptionState.empty(ordered(events)[0]), events)


def needs_refold(state: SubscriptionState | None, events: Iterable[CanonicalEvent]) -> bool:
    """Rule 3: an event that sorts before the last applied one means the history must be re-folded."""
    if state is None or state.last_event is None:
        return False
    return any(sort_key(e) <= state.last_event for e in events)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    new: tuple[Transition, ...]
    superseded: tuple[str, ...]
    revived: tuple[str, ...]


def reconcile(existing: Mapping[str, bool], folded: Sequence[Transition]) -> Reconciliation:
    """Compare a fresh fold with what was emitted before (`existing`: id → superseded?).

    New ids are emitted; ids the fold no longer produces are superseded; a superseded id the fold
    produces again is revived. Ids are deterministic, so nothing already emitted is emitted twice.
    """
    folded_ids = {t.id for t in folded}
    return Reconciliation(
        new=tuple(t for t in folded if t.id not in existing),
        superseded=tuple(i for i, gone in existing.items() if not gone and i not in folded_ids),
        revived=tuple(i for i, gone in existing.items() if gone and i in folded_ids),
    )


def inferred_expiration(state: SubscriptionState, now: datetime, grace: timedelta) -> CanonicalEvent | None:
    """Rule 6: when a period ended (plus grace) with no renewal, the scheduler logs an expiration fact.

    The fact happened when the period ended, not when it was noticed: it is dated `expires_at`, so a
    real `expiration` of the same period (dated at or after the period end) sorts after it and is a
    no-op, whatever the grace. It names the period it closes (`expires_at`), so a renewal that turns
    up later but happened before makes it a no-op on re-fold. Its id is a digest of (subscription,
    period end): inferring it twice stores it once, and it stays within the canonical id limit
    however long the subscription key is.
    """
    if not state.live or state.paused or state.expires_at is None:
        return None
    due = state.expires_at + grace
    if due > now:
        return None
    if state.billing_issue:
        reason = Reason.BILLING_ERROR
    elif not state.auto_renew:
        reason = Reason.UNSUBSCRIBE
    else:
        reason = Reason.UNKNOWN
    period_end = format_time(state.expires_at)
    digest = hashlib.sha256(f"{state.key}\x1f{period_end}".encode()).hexdigest()[:32]
    return CanonicalEvent(
        id=f"expire:{period_end}:{digest}",
        source=Source.SCHEDULER,
        app_id=state.app_id,
        type=EventType.EXPIRATION,
        occurred_at=state.expires_at,
        expires_at=state.expires_at,
        subscription_id=state.subscription_id,
        app_user_id=state.app_user_id,
        store=state.store,
        environment=state.environment,
        reason=reason,
    )


def is_historical(occurred_at: datetime, received_at: datetime, horizon: timedelta) -> bool:
    """Rule 5: facts older than the horizon at arrival are history, not news."""
    return received_at - occurred_at > horizon
