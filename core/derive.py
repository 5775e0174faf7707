"""The derive step: what a subscription's facts make of its state and transitions (rules 1-3).

One function for every path that derives: an ingest appending new facts, a replay rebuilding from
the log, and `verify` checking what is stored (outbox/derive.py adds the messages). Keeping one
copy is the point: the three used to hold their own fold-and-reconcile and had started to differ.

- New facts that all sort after the state's last one advance the stored state (the usual, cheap
  path: no history is read).
- Otherwise (a late fact, or no state to trust) the whole history is folded again and compared
  with what was emitted before: ids are deterministic (rule 2), so new ids are emitted, ids the
  fold no longer produces are superseded, and superseded ids it produces again are revived.

Pure: the caller reads the history and the emitted ids, and writes what comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from subledger.core.events import CanonicalEvent
from subledger.core.lifecycle import SubscriptionState, Transition, advance, fold, needs_refold, reconcile


# Located and Emitted are made once per fact on the ingest's hot path: plain slotted classes,
# which build three times faster than frozen ones (nothing mutates them after construction).
@dataclass(slots=True)
class Located:
    """A fact where the log holds it: its entry's position and `historical` flag."""

    event: CanonicalEvent
    position: int
    historical: bool


@dataclass(slots=True)
class Emitted:
    """A transition with the log entry of the fact that caused it."""

    transition: Transition
    position: int
    historical: bool


@dataclass(frozen=True, slots=True)
class Known:
    """What a re-fold needs besides the new facts: the subscription's logged facts and
    `emitted` (transition id → superseded?) for everything emitted for it before."""

    history: Sequence[Located]
    emitted: Mapping[str, bool]


@dataclass(frozen=True, slots=True)
class Derivation:
    """`new`: transitions to emit; `superseded`/`revived`: ids whose standing changes; `folded`:
    every transition the fold produces (on the advance path, the new ones)."""

    state: SubscriptionState
    last_position: int
    new: tuple[Emitted, ...]
    folded: tuple[Emitted, ...]
    superseded: tuple[str, ...] = ()
    revived: tuple[str, ...] = ()


def needs_history(state: SubscriptionState | None, fresh: Sequence[Located]) -> bool:
    """Whether `derive` needs `Known` for these facts: a stored state and a fact sorting before its last."""
    return state is not None and needs_refold(state, [f.event for f in fresh])


def derive(
    fresh: Sequence[Located], state: SubscriptionState | None = None, known: Known | None = None
) -> Derivation:
    """Derive one subscription from `fresh` facts on top of `state`, or from `known` history + `fresh`.

    With `known`, the whole history is re-folded (a fact repeated in both counts once) and
    reconciled with what was emitted; without it, `fresh` must sort after `state`
    (`needs_history` is false) and advances it.
    """
    if known is None:
        if needs_history(state, fresh):
            raise ValueError("a late fact needs the subscription's history (Known)")
        events = [f.event for f in fresh]
        start = state or SubscriptionState.empty(min(events, key=lambda e: e.occurred_at))
        advanced = advance(start, events)
        located = _origins(fresh)
        emitted = tuple([_emitted(t, located) for t in advanced.transitions])
        return Derivation(advanced.state, max(f.position for f in fresh), emitted, emitted)
    everything = [*fresh, *known.history]
    located = _origins(everything)
    refolded = fold([f.event for f in known.history] + [f.event for f in fresh])
    diff = reconcile(known.emitted, refolded.transitions)
    return Derivation(
        state=refolded.state,
        last_position=max(f.position for f in everything),
        new=tuple(_emitted(t, located) for t in diff.new),
        folded=tuple(_emitted(t, located) for t in refolded.transitions),
        superseded=diff.superseded,
        revived=diff.revived,
    )


def _origins(facts: Sequence[Located]) -> dict[tuple[str, str], tuple[int, bool]]:
    """(source, id) → (position, historical); a fact both fresh and in the history is the logged one."""
    return {(f.event.source.value, f.event.id): (f.position, f.historical) for f in facts}


def _emitted(transition: Transition, located: Mapping[tuple[str, str], tuple[int, bool]]) -> Emitted:
    return Emitted(transition, *located[(transition.event_source, transition.event_id)])
