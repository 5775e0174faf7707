"""Properties of the lifecycle fold (lifecycle.md rules 1-4) over generated histories of one subscription.

Histories mix every `EventType` with a small pool of transaction ids, prices and products, so that
duplicates, re-used transactions and contradictory facts turn up often.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from subledger.core.events import CanonicalEvent, EventType, PeriodType, Reason, parse_event
from subledger.core.lifecycle import (
    Fold,
    SubscriptionState,
    Transition,
    TransitionKind,
    advance,
    fold,
    needs_refold,
    ordered,
    reconcile,
    transition_id,
)

FAST = settings(max_examples=200, deadline=None)
T0 = datetime(2024, 1, 1, tzinfo=UTC)
NEEDS_PRODUCT = {EventType.PURCHASE, EventType.RENEWAL, EventType.ONE_TIME_PURCHASE}
SIGNED = {EventType.REFUND, EventType.REFUND_REVERSED}


# Each event is drawn as ONE integer, decoded in mixed radix into a choice per field: drawing is most
# of the cost of these tests, and one draw per event keeps the file fast. Shrinking moves every
# field towards its first choice (None = absent).
CHOICES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("type", tuple(EventType)),
    ("gap", (1, 60, 60 * 24, 60 * 24 * 7, 60 * 24 * 30)),  # minutes after the previous event
    ("source", ("custom", "apple", "revenuecat", "scheduler")),
    ("period_type", tuple(p.value for p in PeriodType)),
    ("product", ("monthly", "yearly")),
    ("price", (None, "0", "4.99", "9.99", "-9.99")),
    ("transaction_id", (None, "t1", "t2", "t3", "t4")),
    ("reason", (None, *(r.value for r in Reason))),
    ("app_user_id", (None, "u1", "u2")),
    ("country_code", (None, "US", "DE")),
    ("environment", ("production", "production", "sandbox")),
    ("expires_in_days", (None, 30, 7, 1, -5, 40)),
)
SPACE = math.prod(len(values) for _, values in CHOICES)
_CODES = st.lists(st.integers(0, SPACE - 1), min_size=1, max_size=12)


def decode(code: int) -> dict[str, Any]:
    choice: dict[str, Any] = {}
    for name, values in CHOICES:
        code, index = divmod(code, len(values))
        choice[name] = values[index]
    return choice


@st.composite
def histories(draw: st.DrawFn) -> list[CanonicalEvent]:
    """Events of one subscription with distinct `occurred_at` values, in occurrence order."""
    choices = [decode(code) for code in draw(_CODES)]
    if draw(st.integers(0, 3)):
        choices[0]["type"] = EventType.PURCHASE  # most histories start with one, so that they get somewhere
    out = []
    minute = 0
    for n, c in enumerate(choices):
        kind: EventType = c["type"]
        minute += c["gap"]
        occurred = T0 + timedelta(minutes=minute)
        body: dict[str, Any] = {
            "id": f"e{n}",
            "source": c["source"],
            "app_id": "com.example.app",
            "type": kind.value,
            "occurred_at": occurred.isoformat(),
            "subscription_id": "sub-1",
            "store": "app_store",
            "period_type": c["period_type"],
            "environment": c["environment"],
            "transaction_id": c["transaction_id"],
            "reason": c["reason"],
            "app_user_id": c["app_user_id"],
            "country_code": c["country_code"],
        }
        if kind in NEEDS_PRODUCT:
            body["product_id"] = c["product"]
        if kind is EventType.PRODUCT_CHANGE:
            body["new_product_id"] = c["product"]
        if c["price"] is not None:
            price: str = c["price"]
            body["price"] = price if kind in SIGNED else price.lstrip("-")  # only a refund's sign is ignored
            body["currency"] = "EUR" if n % 3 == 0 else "USD"
        if c["expires_in_days"] is not None:
            body["expires_at"] = (occurred + timedelta(days=c["expires_in_days"])).isoformat()
        out.append(parse_event({k: v for k, v in body.items() if v is not None}))
    return out


def ids(result: Fold) -> list[str]:
    return [t.id for t in result.transitions]


def incremental(arrivals: Sequence[CanonicalEvent]) -> tuple[SubscriptionState, set[str]]:
    """Ingestion one event at a time: advance when in order, else re-fold and reconcile (rule 3)."""
    log: list[CanonicalEvent] = []
    state: SubscriptionState | None = None
    existing: dict[str, bool] = {}  # id -> superseded?
    for event in arrivals:
        if any((e.source, e.id) == (event.source, event.id) for e in log):
            continue  # rule 4: stored once, derives once
        log.append(event)
        if state is None or needs_refold(state, [event]):
            result = fold(log)
            outcome = reconcile(existing, result.transitions)
            existing.update({t.id: False for t in outcome.new})
            existing.update({i: True for i in outcome.superseded})
            existing.update({i: False for i in outcome.revived})
        else:
            result = advance(state, [event])
            assert not any(t.id in existing for t in result.transitions)
            existing.update({t.id: False for t in result.transitions})
        state = result.state
    assert state is not None
    return state, {i for i, gone in existing.items() if not gone}


@FAST
@given(st.data())
def test_any_permutation_folds_to_the_same_state_and_ids(data: st.DataObject) -> None:
    history = data.draw(histories())
    shuffled = data.draw(st.permutations(history))
    a, b = fold(history), fold(shuffled)
    assert a.state == b.state
    assert ids(a) == ids(b)
    assert a == b


@FAST
@given(histories())
def test_folding_twice_is_identical(history: list[CanonicalEvent]) -> None:
    assert fold(history) == fold(history)
    assert fold(list(history)).state.to_json() == fold(history).state.to_json()


@FAST
@given(st.data())
def test_duplicated_events_add_nothing(data: st.DataObject) -> None:
    history = data.draw(histories())
    repeats = data.draw(st.lists(st.sampled_from(history), min_size=1, max_size=6))
    noisy = data.draw(st.permutations([*history, *repeats]))
    assert fold(noisy) == fold(history)
    assert ordered(noisy) == ordered(history)


@FAST
@given(st.data())
def test_incremental_arrival_in_any_order_ends_like_the_sorted_fold(data: st.DataObject) -> None:
    history = data.draw(histories())
    repeats = data.draw(st.lists(st.sampled_from(history), max_size=3))
    arrivals = data.draw(st.permutations([*history, *repeats]))
    state, live = incremental(arrivals)
    expected = fold(history)
    assert live == set(ids(expected))
    assert state == expected.state


@FAST
@given(histories())
def test_in_order_arrival_never_refolds_and_emits_the_fold(history: list[CanonicalEvent]) -> None:
    state = fold(history[:1])
    emitted = list(state.transitions)
    current = state.state
    for event in history[1:]:
        assert not needs_refold(current, [event])
        step_result = advance(current, [event])
        emitted.extend(step_result.transitions)
        current = step_result.state
    assert tuple(emitted) == fold(history).transitions


@FAST
@given(histories())
def test_every_trial_conversion_follows_a_trial_start(history: list[CanonicalEvent]) -> None:
    started = False
    for transition in fold(history).transitions:
        if transition.kind is TransitionKind.TRIAL_STARTED:
            started = True
        if transition.kind is TransitionKind.TRIAL_CONVERTED:
            assert started
            assert transition.is_trial_conversion is True


@FAST
@given(histories())
def test_transition_ids_are_deterministic(history: list[CanonicalEvent]) -> None:
    result = fold(history)
    by_event = {(e.source.value, e.id): e for e in history}
    for transition in result.transitions:
        cause = by_event[(transition.event_source, transition.event_id)]
        assert transition.id == transition_id(
            cause.subscription_key, cause.source.value, cause.id, transition.kind.value
        )
        assert len(transition.id) <= 64
    assert len(set(ids(result))) == len(result.transitions)  # at most one transition per fact
    assert len({(t.event_source, t.event_id) for t in result.transitions}) == len(result.transitions)


@FAST
@given(histories())
def test_transitions_carry_the_state_after_their_fact(history: list[CanonicalEvent]) -> None:
    """What `step` reports matches what the state says, and revenue signs follow lifecycle.md."""
    result = fold(history)
    for transition in result.transitions:
        prefix = [e for e in history if e.sort_key <= next(
            x.sort_key for x in history if (x.source.value, x.id) == (transition.event_source, transition.event_id))]
        assert fold(prefix).state.status == transition.status
        if transition.kind is TransitionKind.CANCELLATION and transition.price is not None:
            assert transition.price <= 0
        if transition.kind in (TransitionKind.TRIAL_STARTED, TransitionKind.BILLING_ISSUE,
                               TransitionKind.UNCANCELLATION, TransitionKind.EXPIRATION):
            assert transition.price is None


@FAST
@given(histories())
def test_json_round_trips(history: list[CanonicalEvent]) -> None:
    result = fold(history)
    state = result.state
    assert SubscriptionState.from_json(json.loads(json.dumps(state.to_json()))) == state
    for transition in result.transitions:
        data = json.loads(json.dumps(transition.to_json()))
        assert None not in data.values()
        assert Transition.from_json(data) == transition
        assert Transition.from_json(data).to_json() == transition.to_json()


@FAST
@given(st.data())
def test_advance_continues_a_fold(data: st.DataObject) -> None:
    history = data.draw(histories())
    cut = data.draw(st.integers(1, len(history)))
    prefix, suffix = history[:cut], history[cut:]
    shuffled_suffix = data.draw(st.permutations(suffix))
    assert not needs_refold(fold(prefix).state, suffix)
    resumed = advance(fold(prefix).state, shuffled_suffix)
    whole = fold(prefix + suffix)
    assert resumed.state == whole.state
    assert fold(prefix).transitions + resumed.transitions == whole.transitions
    # ... and from a state that went through the projection's JSON
    stored = SubscriptionState.from_json(json.loads(json.dumps(fold(prefix).state.to_json())))
    assert advance(stored, suffix) == resumed
