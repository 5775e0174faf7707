"""Named lifecycle scenarios (lifecycle.md): each store story and the exact transitions it derives.

Every scenario is a list of canonical facts, in occurrence order, and the transitions expected from
the fold: the kind and the fields that carry meaning for Segment (revenue sign, reasons, renewal
number, the status after the fact). Late delivery is covered by re-playing the first scenario with
each adjacent pair swapped, one event at a time, the way ingestion meets them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from subledger.core.events import CanonicalEvent, EventType, PeriodType, Reason, Source, parse_event
from subledger.core.lifecycle import (
    Fold,
    Status,
    SubscriptionState,
    Transition,
    TransitionKind,
    advance,
    fold,
    inferred_expiration,
    is_historical,
    needs_refold,
    reconcile,
    step,
    transition_id,
)

T0 = datetime(2024, 1, 1, 9, 0, tzinfo=UTC)
K = TransitionKind
S = Status


def at(days: float) -> str:
    return (T0 + timedelta(days=days)).isoformat()


def ev(n: int, type_: str, days: float, **fields: Any) -> dict[str, Any]:
    """A canonical body of subscription `sub-1`, as `POST /v1/events` would receive it."""
    body: dict[str, Any] = {
        "id": f"e{n}",
        "app_id": "com.example.app",
        "type": type_,
        "occurred_at": at(days),
        "subscription_id": "sub-1",
        "store": "app_store",
        "app_user_id": "user-1",
    }
    if type_ in ("purchase", "renewal", "one_time_purchase"):
        body["product_id"] = "pro_monthly"
    body.update(fields)
    return body


def paid(txn: str, days: float, price: str = "9.99", **fields: Any) -> dict[str, Any]:
    """A charge at `days` for a 30-day period."""
    return {"price": price, "currency": "USD", "transaction_id": txn, "expires_at": at(days + 30), **fields}


def events(*bodies: dict[str, Any]) -> list[CanonicalEvent]:
    return [parse_event({k: v for k, v in body.items() if v is not None}) for body in bodies]


@dataclass(frozen=True)
class Expect:
    kind: TransitionKind
    status: Status | None
    fields: dict[str, Any] = field(default_factory=dict)


def purchase(n: int, days: float, txn: str, **kw: Any) -> dict[str, Any]:
    return ev(n, "purchase", days, **paid(txn, days, **kw))


def renewal(n: int, days: float, txn: str, **kw: Any) -> dict[str, Any]:
    return ev(n, "renewal", days, **paid(txn, days, **kw))


TRIAL = {"period_type": "trial", "price": "0"}

# trial → converted → renewals → cancellation → expiration: the spine every other test leans on.
TRIAL_TO_EXPIRY = [
    ev(1, "purchase", 0, transaction_id="t0", expires_at=at(7), **TRIAL),
    renewal(2, 7, "t1"),
    renewal(3, 37, "t2"),
    renewal(4, 67, "t3"),
    ev(5, "auto_renew_disabled", 80),
    ev(6, "expiration", 97, reason="unsubscribe"),
]

SCENARIOS: dict[str, tuple[list[dict[str, Any]], list[Expect]]] = {
    "trial_converted_renewed_cancelled_expired": (
        TRIAL_TO_EXPIRY,
        [
            Expect(K.TRIAL_STARTED, S.TRIAL, {"price": None, "renewal_number": None, "period_type": "trial"}),
            Expect(
                K.TRIAL_CONVERTED,
                S.ACTIVE,
                {"price": Decimal("9.99"), "currency": "USD", "renewal_number": 1, "is_trial_conversion": True,
                 "period_type": "normal"},
            ),
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 2, "is_trial_conversion": False, "price": Decimal("9.99")}),
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 3, "transaction_id": "t3"}),
            Expect(K.CANCELLATION, S.CANCELLED, {"cancel_reason": Reason.UNSUBSCRIBE, "price": None}),
            Expect(K.EXPIRATION, S.EXPIRED, {"expiration_reason": Reason.UNSUBSCRIBE}),
        ],
    ),
    "paid_initial_purchase": (
        [purchase(1, 0, "t0")],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE, {"price": Decimal("9.99"), "currency": "USD",
                                                "product_id": "pro_monthly", "renewal_number": None})],
    ),
    "intro_offer_purchase": (
        [purchase(1, 0, "t0", period_type="intro", price="0.99")],
        [Expect(K.INITIAL_PURCHASE, S.INTRO, {"price": Decimal("0.99"), "period_type": "intro"})],
    ),
    "trial_cancelled_then_expired": (
        [
            ev(1, "purchase", 0, transaction_id="t0", expires_at=at(7), **TRIAL),
            ev(2, "auto_renew_disabled", 2),
            ev(3, "expiration", 7),
        ],
        [
            Expect(K.TRIAL_STARTED, S.TRIAL),
            Expect(K.TRIAL_CANCELLED, S.CANCELLED_TRIAL, {"cancel_reason": Reason.UNSUBSCRIBE, "price": None}),
            Expect(K.EXPIRATION, S.EXPIRED, {"expiration_reason": Reason.UNKNOWN}),
        ],
    ),
    "billing_issue_then_recovered": (
        [
            purchase(1, 0, "t0"),
            ev(2, "billing_issue", 30),
            ev(3, "billing_recovered", 33, **paid("t1", 33)),
        ],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE),
            Expect(K.BILLING_ISSUE, S.GRACE_PERIOD, {"price": None}),
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 1, "price": Decimal("9.99"), "is_trial_conversion": False}),
        ],
    ),
    "billing_issue_in_trial_then_recovered": (
        [
            ev(1, "purchase", 0, transaction_id="t0", expires_at=at(7), **TRIAL),
            ev(2, "billing_issue", 7),
            ev(3, "billing_recovered", 9, **paid("t1", 9)),
        ],
        [
            Expect(K.TRIAL_STARTED, S.TRIAL),
            Expect(K.BILLING_ISSUE, S.GRACE_PERIOD_TRIAL),
            Expect(K.TRIAL_CONVERTED, S.ACTIVE, {"renewal_number": 1, "is_trial_conversion": True}),
        ],
    ),
    "refund_of_the_whole_charge": (
        [purchase(1, 0, "t0"), ev(2, "refund", 3, transaction_id="t0")],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE, {"price": Decimal("9.99")}),
            # issue 14: a refund reports money back and leaves the subscription as it was
            Expect(K.CANCELLATION, S.ACTIVE,
                   {"cancel_reason": Reason.CUSTOMER_SUPPORT, "price": Decimal("-9.99"), "currency": "USD"}),
        ],
    ),
    "partial_refund_sign_ignored": (
        [purchase(1, 0, "t0"), renewal(2, 30, "t1"), ev(3, "refund", 31, price="-4.50", currency="USD")],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE),
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 1}),
            Expect(K.CANCELLATION, S.ACTIVE, {"cancel_reason": Reason.CUSTOMER_SUPPORT, "price": Decimal("-4.50")}),
        ],
    ),
    "refund_after_expiry_still_reported": (
        [purchase(1, 0, "t0"), ev(2, "expiration", 30), ev(3, "refund", 40, transaction_id="t0")],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE),
            Expect(K.EXPIRATION, S.EXPIRED),
            Expect(K.CANCELLATION, S.EXPIRED, {"price": Decimal("-9.99")}),
        ],
    ),
    "product_change": (
        [
            purchase(1, 0, "t0"),
            ev(2, "product_change", 10, new_product_id="pro_yearly"),
            renewal(3, 30, "t1", product_id="pro_yearly", price="99.99"),
        ],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE, {"product_id": "pro_monthly"}),
            Expect(K.PRODUCT_CHANGE, S.ACTIVE,
                   {"product_id": "pro_monthly", "new_product_id": "pro_yearly", "price": None}),
            Expect(K.RENEWAL, S.ACTIVE, {"product_id": "pro_yearly", "price": Decimal("99.99")}),
        ],
    ),
    "uncancellation": (
        [
            purchase(1, 0, "t0"),
            ev(2, "auto_renew_disabled", 5, reason="price_increase"),
            ev(3, "auto_renew_enabled", 6),
            renewal(4, 30, "t1"),
        ],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE),
            Expect(K.CANCELLATION, S.CANCELLED, {"cancel_reason": Reason.PRICE_INCREASE}),
            Expect(K.UNCANCELLATION, S.ACTIVE, {"price": None}),
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 1}),
        ],
    ),
    "resubscribe_after_expiry": (
        [
            purchase(1, 0, "t0"),
            renewal(2, 30, "t1"),
            ev(3, "expiration", 60),
            purchase(4, 90, "t2"),
        ],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE),
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 1}),
            Expect(K.EXPIRATION, S.EXPIRED),
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 2, "price": Decimal("9.99"), "transaction_id": "t2"}),
        ],
    ),
    "pause_scheduled_paused_resumed": (
        [
            purchase(1, 0, "t0", store="play_store"),
            ev(2, "pause_scheduled", 20),
            ev(3, "paused", 30),
            ev(4, "resumed", 60),
            renewal(5, 60, "t1"),
        ],
        [
            Expect(K.INITIAL_PURCHASE, S.ACTIVE),
            Expect(K.SUBSCRIPTION_PAUSED, S.ACTIVE, {"price": None}),  # scheduled: still active until it starts
            Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 1}),
        ],
    ),
    "pause_effective_immediately": (
        [purchase(1, 0, "t0"), ev(2, "paused", 30)],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE), Expect(K.SUBSCRIPTION_PAUSED, S.PAUSED)],
    ),
    "one_time_purchase": (
        [ev(1, "one_time_purchase", 0, subscription_id=None, product_id="coins_100", price="1.99",
            currency="EUR", transaction_id="otp-1")],
        # not a subscription: no `subscription_status` to report
        [Expect(K.NON_SUBSCRIPTION_PURCHASE, None,
                {"product_id": "coins_100", "price": Decimal("1.99"), "currency": "EUR", "period_type": None})],
    ),
    "noop_second_auto_renew_disabled": (
        [purchase(1, 0, "t0"), ev(2, "auto_renew_disabled", 5), ev(3, "auto_renew_disabled", 6)],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE), Expect(K.CANCELLATION, S.CANCELLED)],
    ),
    "noop_expiration_of_expired": (
        [purchase(1, 0, "t0"), ev(2, "expiration", 30), ev(3, "expiration", 31, source="apple")],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE), Expect(K.EXPIRATION, S.EXPIRED)],
    ),
    "noop_renewal_already_applied": (
        [purchase(1, 0, "t0"), renewal(2, 30, "t1"), renewal(3, 30.01, "t1", source="revenuecat")],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE), Expect(K.RENEWAL, S.ACTIVE, {"renewal_number": 1})],
    ),
    "noop_purchase_replayed_by_another_source": (
        [purchase(1, 0, "t0"), purchase(2, 0.001, "t0", source="revenuecat")],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE)],
    ),
    "noop_second_billing_issue_and_same_product_change": (
        [
            purchase(1, 0, "t0"),
            ev(2, "billing_issue", 30),
            ev(3, "billing_issue", 31),
            ev(4, "product_change", 32, new_product_id="pro_monthly"),
        ],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE), Expect(K.BILLING_ISSUE, S.GRACE_PERIOD)],
    ),
    "noop_facts_before_any_purchase": (
        [ev(1, "auto_renew_enabled", 0), ev(2, "billing_issue", 1), ev(3, "expiration", 2), ev(4, "paused", 3)],
        [],
    ),
    "noop_refund_reversed_extended_resumed": (
        [
            purchase(1, 0, "t0"),
            ev(2, "extended", 10, expires_at=at(45)),
            ev(3, "refund_reversed", 11, transaction_id="t0"),
            ev(4, "resumed", 12),
        ],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE)],
    ),
    "noop_second_refund_of_one_transaction": (
        [purchase(1, 0, "t0"), ev(2, "refund", 3, transaction_id="t0"), ev(3, "refund", 4, transaction_id="t0",
                                                                           source="apple")],
        [Expect(K.INITIAL_PURCHASE, S.ACTIVE), Expect(K.CANCELLATION, S.ACTIVE)],
    ),
}


def _value(transition: Transition, name: str) -> Any:
    value = getattr(transition, name)
    return value.value if name == "period_type" and value is not None else value


@pytest.mark.parametrize(("bodies", "expected"), list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_scenario(bodies: list[dict[str, Any]], expected: list[Expect]) -> None:
    facts = events(*bodies)
    result = fold(facts)
    got = [(t.kind, t.status) for t in result.transitions]
    assert got == [(e.kind, e.status) for e in expected]
    for transition, expect in zip(result.transitions, expected, strict=True):
        for name, value in expect.fields.items():
            assert _value(transition, name) == value, (transition.kind, name)
        # every transition names the fact that caused it, and its id is the pure function of rule 2
        cause = next(e for e in facts if (e.source.value, e.id) == (transition.event_source, transition.event_id))
        assert transition.occurred_at == cause.occurred_at
        assert transition.id == transition_id(result.state.key, cause.source.value, cause.id, transition.kind.value)
    # exactly one transition per fact at most
    causes = [(t.event_source, t.event_id) for t in result.transitions]
    assert len(causes) == len(set(causes))
    # no-op facts leave the status where the last transition put it
    assert result.state.status == (expected[-1].status if expected else None)


def test_scenario_statuses_after_each_fact() -> None:
    """The trait value is the state after the fact; facts without a transition still move the state."""
    state: SubscriptionState | None = None
    statuses = []
    for event in events(*SCENARIOS["pause_scheduled_paused_resumed"][0]):
        state = fold([event]).state if state is None else advance(state, [event]).state
        statuses.append(state.status)
    assert statuses == [S.ACTIVE, S.ACTIVE, S.PAUSED, S.ACTIVE, S.ACTIVE]


def test_exactly_one_transition_per_fact_trial_start_is_not_also_initial_purchase() -> None:
    result = fold(events(TRIAL_TO_EXPIRY[0]))
    assert [t.kind for t in result.transitions] == [K.TRIAL_STARTED]


def test_renewal_before_any_purchase_is_still_a_renewal() -> None:
    """A subscription that started before subledger saw it: its first renewal is news, not an initial purchase."""
    result = fold(events(renewal(1, 30, "t1")))
    assert [(t.kind, t.renewal_number) for t in result.transitions] == [(K.RENEWAL, 1)]


def test_a_shuffled_batch_yields_the_transitions_of_the_sorted_one() -> None:
    facts = events(*TRIAL_TO_EXPIRY)
    first = fold(facts[:1])
    in_order = advance(first.state, facts[1:])
    shuffled = advance(first.state, list(reversed(facts[1:])))
    assert shuffled == in_order


# -- late events: one event at a time, the way ingestion meets them (rule 3) -------------------------


@dataclass
class Ledger:
    """What ingestion keeps for one subscription: the log, the projection and the emitted transitions."""

    log: list[CanonicalEvent] = field(default_factory=list)
    state: SubscriptionState | None = None
    emitted: dict[str, Transition] = field(default_factory=dict)
    superseded: dict[str, bool] = field(default_factory=dict)
    refolds: int = 0

    def ingest(self, event: CanonicalEvent) -> Fold | None:
        if any((e.source, e.id) == (event.source, event.id) for e in self.log):
            return None  # rule 4: a duplicate is stored once and derives nothing
        self.log.append(event)
        if self.state is None or needs_refold(self.state, [event]):
            self.refolds += self.state is not None
            result = fold(self.log)
            outcome = reconcile(self.superseded, result.transitions)
            for transition in outcome.new:
                self.emitted[transition.id] = transition
                self.superseded[transition.id] = False
            for gone in outcome.superseded:
                self.superseded[gone] = True
            for back in outcome.revived:
                self.superseded[back] = False
        else:
            result = advance(self.state, [event])
            for transition in result.transitions:
                assert transition.id not in self.superseded  # new facts can only make new ids
                self.emitted[transition.id] = transition
                self.superseded[transition.id] = False
        self.state = result.state
        return result

    @property
    def live_ids(self) -> set[str]:
        return {i for i, gone in self.superseded.items() if not gone}


def ingest_one_by_one(arrivals: Sequence[CanonicalEvent]) -> Ledger:
    ledger = Ledger()
    for event in arrivals:
        ledger.ingest(event)
    return ledger


SPINE = events(*TRIAL_TO_EXPIRY)
SWAPS = [pytest.param(i, id=f"{SPINE[i].type.value}<->{SPINE[i + 1].type.value}") for i in range(len(SPINE) - 1)]


@pytest.mark.parametrize("i", SWAPS)
def test_adjacent_pair_delivered_out_of_order(i: int) -> None:
    arrivals = list(SPINE)
    arrivals[i], arrivals[i + 1] = arrivals[i + 1], arrivals[i]
    ledger = ingest_one_by_one(arrivals)
    expected = fold(SPINE)
    assert ledger.refolds == 1
    assert ledger.live_ids == {t.id for t in expected.transitions}
    assert ledger.state == expected.state


def test_late_purchase_supersedes_the_renewal_it_turns_into_a_conversion() -> None:
    arrivals = list(SPINE)
    arrivals[0], arrivals[1] = arrivals[1], arrivals[0]
    ledger = ingest_one_by_one(arrivals)
    gone = [ledger.emitted[i] for i, flag in ledger.superseded.items() if flag]
    assert [(t.kind, t.event_id) for t in gone] == [(K.RENEWAL, "e2")]
    live = sorted((ledger.emitted[i] for i in ledger.live_ids), key=lambda t: t.occurred_at)
    assert [t.kind for t in live[:2]] == [K.TRIAL_STARTED, K.TRIAL_CONVERTED]


def test_late_cancellation_keeps_expiration_id_and_adds_the_cancellation() -> None:
    arrivals = [*SPINE[:4], SPINE[5], SPINE[4]]
    ledger = ingest_one_by_one(arrivals)
    assert not any(ledger.superseded.values())
    assert ledger.live_ids == {t.id for t in fold(SPINE).transitions}


def test_fully_reversed_delivery_and_redelivery_end_where_the_sorted_fold_does() -> None:
    ledger = ingest_one_by_one([*reversed(SPINE), *SPINE])
    assert ledger.live_ids == {t.id for t in fold(SPINE).transitions}
    assert ledger.state == fold(SPINE).state


def test_superseded_then_revived() -> None:
    """A transition that a late fact supersedes comes back when the fold produces it again."""
    base = events(purchase(1, 0, "t0"), ev(2, "auto_renew_disabled", 10))
    ledger = ingest_one_by_one(base)
    cancellation = next(t for t in ledger.emitted.values() if t.kind is K.CANCELLATION)
    # an expiration dated before the cancellation turns the cancellation into a no-op ...
    early_expiry = events(ev(3, "expiration", 5))[0]
    ledger.ingest(early_expiry)
    assert ledger.superseded[cancellation.id] is True
    outcome = reconcile(ledger.superseded, fold(base).transitions)  # ... and a fold without it revives it
    assert outcome.revived == (cancellation.id,)
    assert outcome.new == ()


def test_needs_refold() -> None:
    facts = events(*TRIAL_TO_EXPIRY)
    state = fold(facts[:3]).state
    assert not needs_refold(None, facts)
    assert not needs_refold(state, facts[3:])
    assert needs_refold(state, [facts[1]])  # a repeat of an applied one
    assert needs_refold(state, [facts[3], facts[0]])
    assert state.last_event is not None and state.events_applied == 3


def test_fold_needs_events() -> None:
    with pytest.raises(ValueError):
        fold([])


# -- time-based facts (rule 6) ------------------------------------------------------------------------

GRACE = timedelta(hours=6)


def _expiring() -> tuple[list[CanonicalEvent], SubscriptionState]:
    facts = events(purchase(1, 0, "t0"), ev(2, "auto_renew_disabled", 3))
    return facts, fold(facts).state


def test_inferred_expiration_only_after_period_end_plus_grace() -> None:
    facts, state = _expiring()
    assert state.expires_at == T0 + timedelta(days=30)
    assert inferred_expiration(state, state.expires_at + GRACE - timedelta(seconds=1), GRACE) is None
    inferred = inferred_expiration(state, state.expires_at + GRACE, GRACE)
    assert inferred is not None
    assert inferred.source is Source.SCHEDULER and inferred.type is EventType.EXPIRATION
    assert inferred.reason is Reason.UNSUBSCRIBE
    assert inferred.subscription_key == state.key
    again = inferred_expiration(state, state.expires_at + 10 * GRACE, GRACE)
    assert again is not None and again.id == inferred.id  # inferring twice stores it once
    result = fold([*facts, inferred])
    assert [t.kind for t in result.transitions][-1] is K.EXPIRATION
    assert result.state.status is S.EXPIRED
    assert inferred_expiration(result.state, state.expires_at + 10 * GRACE, GRACE) is None


def test_inferred_expiration_reason_and_no_inference_when_paused_or_expired() -> None:
    facts = events(purchase(1, 0, "t0"), ev(2, "billing_issue", 30))
    state = fold(facts).state
    later = T0 + timedelta(days=60)
    inferred = inferred_expiration(state, later, GRACE)
    assert inferred is not None and inferred.reason is Reason.BILLING_ERROR
    live = fold(events(purchase(1, 0, "t0"))).state
    inferred = inferred_expiration(live, later, GRACE)
    assert inferred is not None and inferred.reason is Reason.UNKNOWN
    paused = fold(events(purchase(1, 0, "t0"), ev(2, "paused", 10))).state
    assert inferred_expiration(paused, later, GRACE) is None
    expired = fold(events(purchase(1, 0, "t0"), ev(2, "expiration", 30))).state
    assert inferred_expiration(expired, later, GRACE) is None


def test_inferred_expiration_is_a_valid_log_entry_whatever_the_key_length() -> None:
    """The scheduler's fact is stored and re-read like any other: its id must fit the canonical limit."""
    token = "p" * 480  # Play purchase tokens are long
    facts = events(ev(1, "purchase", 0, subscription_id=token, store="play_store", app_id="a" * 150,
                      **paid("t0", 0)))
    state = fold(facts).state
    inferred = inferred_expiration(state, T0 + timedelta(days=31), GRACE)
    assert inferred is not None
    from subledger.core.events import event_from_facts

    assert event_from_facts(inferred.to_facts()) == inferred


def test_real_expiration_after_inferred_is_a_noop() -> None:
    """Rule 6: a real `expiration` arriving after the scheduler's inference derives nothing new."""
    facts, state = _expiring()
    inferred = inferred_expiration(state, state.expires_at + GRACE + timedelta(minutes=5), GRACE)
    assert inferred is not None
    ledger = ingest_one_by_one([*facts, inferred])
    before = set(ledger.live_ids)
    # the store's own notification of the same expiry, sent a little after the period ended
    real = events(ev(9, "expiration", 30 + 1 / 24, source="apple", reason="unsubscribe"))[0]
    outcome = ledger.ingest(real)
    assert outcome is not None
    assert ledger.live_ids == before
    assert not any(ledger.superseded.values())


def test_late_renewal_makes_the_inferred_expiration_a_noop() -> None:
    """A renewal that happened before the period end but arrived after the inference un-expires it."""
    facts = events(purchase(1, 0, "t0"))
    state = fold(facts).state
    inferred = inferred_expiration(state, state.expires_at + GRACE, GRACE)
    assert inferred is not None
    ledger = ingest_one_by_one([*facts, inferred])
    expiration = next(t for t in ledger.emitted.values() if t.kind is K.EXPIRATION)
    late = events(renewal(2, 29.9, "t1"))[0]
    ledger.ingest(late)
    assert ledger.superseded[expiration.id] is True
    assert ledger.state is not None and ledger.state.status is S.ACTIVE
    assert inferred_expiration(ledger.state, state.expires_at + GRACE, GRACE) is None


def test_is_historical() -> None:
    horizon = timedelta(hours=72)
    assert is_historical(T0, T0 + timedelta(hours=73), horizon)
    assert not is_historical(T0, T0 + timedelta(hours=71), horizon)


def test_step_touches_nothing_but_the_state_it_returns() -> None:
    facts = events(*TRIAL_TO_EXPIRY)
    state = fold(facts[:1]).state
    snapshot = state.to_json()
    step(state, facts[1])
    assert state.to_json() == snapshot


# -- issue 14: refunds are their own facts and leave the subscription as the store does --------------


def test_two_partial_refunds_of_one_charge_are_two_cancellations_and_leave_it_active() -> None:
    result = fold(events(
        purchase(1, 0, "t0"),
        ev(2, "refund", 3, transaction_id="t0", refund_id="re_1", price="-2.50", currency="USD"),
        ev(3, "refund", 4, transaction_id="t0", refund_id="re_2", price="-2.49", currency="USD"),
        ev(4, "refund", 5, transaction_id="t0", refund_id="re_2", price="-2.49", currency="USD"),  # a repeat
    ))
    refunds = [t for t in result.transitions if t.kind is K.CANCELLATION]
    assert [(t.price, t.status, t.transaction_id) for t in refunds] == [
        (Decimal("-2.50"), S.ACTIVE, "t0"), (Decimal("-2.49"), S.ACTIVE, "t0")]
    assert result.state.auto_renew and result.state.status is S.ACTIVE
    # the refund is the cause: its id does not depend on which delivery carried it
    assert refunds[1].id == transition_id(result.state.key, "custom", "refund:re_2", "cancellation")


def test_refund_without_a_refund_id_keeps_the_event_keyed_id_of_older_logs() -> None:
    result = fold(events(purchase(1, 0, "t0"), ev(2, "refund", 3, transaction_id="t0")))
    assert result.transitions[1].id == transition_id(result.state.key, "custom", "e2", "cancellation")


def test_store_revocation_is_its_own_expiration_fact() -> None:
    result = fold(events(purchase(1, 0, "t0"), ev(2, "refund", 3, transaction_id="t0"),
                         ev(3, "expiration", 3, reason="customer_support")))
    assert [(t.kind, t.status) for t in result.transitions] == [
        (K.INITIAL_PURCHASE, S.ACTIVE), (K.CANCELLATION, S.ACTIVE), (K.EXPIRATION, S.EXPIRED)]


def test_refund_with_no_prior_state_names_the_refunded_purchase_from_the_fact() -> None:
    (t,) = fold(events(ev(1, "refund", 3, transaction_id="t0", product_id="pro_yearly", period_type="intro",
                          purchased_at=at(1), price="-9.99", currency="USD"))).transitions
    assert (t.kind, t.product_id, t.period_type, t.purchased_at, t.subscription_id) == (
        K.CANCELLATION, "pro_yearly", PeriodType.INTRO, T0 + timedelta(days=1), "sub-1")
    with_state = fold(events(purchase(1, 0, "t0"), ev(2, "refund", 3, transaction_id="t0"))).transitions[1]
    assert (with_state.product_id, with_state.purchased_at) == ("pro_monthly", T0)


def test_first_renewal_the_source_calls_a_trial_conversion_converts_without_prior_state() -> None:
    late = fold(events(renewal(1, 7, "t1", is_trial_conversion=True))).transitions
    assert [(t.kind, t.is_trial_conversion) for t in late] == [(K.TRIAL_CONVERTED, True)]
    assert [t.kind for t in fold(events(renewal(1, 7, "t1", is_trial_conversion=False))).transitions] == [K.RENEWAL]
    # with prior state the fold decides: a paid period's renewal stays a renewal whatever the flag says
    known = fold(events(purchase(1, 0, "t0"), renewal(2, 30, "t1", is_trial_conversion=True))).transitions
    assert [t.kind for t in known] == [K.INITIAL_PURCHASE, K.RENEWAL]


def test_source_take_home_and_aliases_reach_the_transition() -> None:
    (t,) = fold(events(purchase(1, 0, "t0", takehome_percentage="0.5833", aliases=["$RCAnonymousID:a", "u-0"]))
                ).transitions
    assert (t.takehome_percentage, t.aliases) == (Decimal("0.5833"), ("$RCAnonymousID:a", "u-0"))
    assert Transition.from_json(t.to_json()) == t
