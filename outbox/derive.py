"""The derive step every writer of derived rows shares: ingest, replay and `outbox retry`.

`core.derive` decides what a subscription's facts make of its state and transitions (advance,
or re-fold and reconcile: superseding and revival); this module reads what it needs for that,
renders the messages (`IngestPolicy.rows_for`, with the settle delay of `due_at`) and stages the
result in a unit of work. Ingest and replay differ only in what they ask for: an ingest enqueues
the messages of new transitions; a replay asks for the messages of every live transition, of
which only those in neither the outbox nor the delivered record are added. Both re-enqueue a
revived transition's message from the body it was emitted with, never a second one (rule 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

from subledger.core import derive as core
from subledger.core.derive import Derivation, Known, Located
from subledger.core.lifecycle import SubscriptionState, Transition
from subledger.core.render import Destination
from subledger.outbox import writer
from subledger.store import log, projections
from subledger.store.outbox import OutboxRow
from subledger.store.unit_of_work import UnitOfWork

DEFAULT_HORIZON = timedelta(hours=72)
DEFAULT_RECONCILIATION_HORIZON = timedelta(days=30)


@dataclass(frozen=True)
class IngestPolicy:
    """What the derive step needs from the configuration."""

    destinations: Mapping[str, tuple[Destination, ...]] = field(default_factory=dict)
    horizon: timedelta = DEFAULT_HORIZON
    # how old a fact recovered by reconciliation may be and still be published (outbox/ingest._horizon)
    reconciliation_horizon: timedelta = DEFAULT_RECONCILIATION_HORIZON
    settle_delay: Mapping[str, timedelta] = field(default_factory=dict)

    def destinations_for(self, app_id: str) -> tuple[Destination, ...]:
        return self.destinations.get(app_id, ())

    def due_at(self, app_id: str, now: datetime) -> datetime:
        """When a message written or re-queued at `now` may be sent: after the app's settle delay.

        The one home of that rule, for ingest, replay and `outbox retry` alike, so a late
        out-of-order delivery gets the same chance to settle whichever path made the row due.
        """
        return now + self.settle_delay.get(app_id, timedelta(0))

    def rows_for(
        self,
        transition: Transition,
        *,
        historical: bool,
        now: datetime,
        linked_user: str | None = None,
        destinations: tuple[Destination, ...] | None = None,
    ) -> list[OutboxRow]:
        """The outbox rows of `transition` (for every configured destination unless named), due per `due_at`."""
        return writer.rows_for(
            transition,
            self.destinations_for(transition.app_id) if destinations is None else destinations,
            historical=historical,
            available_at=self.due_at(transition.app_id, now),
            linked_user=linked_user,
        )


@dataclass(frozen=True)
class Derived:
    """A derivation with its messages: `messages` are new (their transitions are), `again` may
    exist already (a revival's, or a replay's of every live transition)."""

    derivation: Derivation
    messages: list[OutboxRow]
    again: list[OutboxRow]


def derive(
    conn: psycopg.Connection,
    key: str,
    fresh: Sequence[Located],
    policy: IngestPolicy,
    now: datetime,
    *,
    state: SubscriptionState | None = None,
    known: Known | None = None,
    linked_user: str | None = None,
    every_message: bool = False,
) -> Derived:
    """Derive subscription `key` and render its messages; reads, never writes.

    `known`: its history and emitted ids when the caller read them (a replay, in bulk); otherwise
    they are read here, and only when a late fact makes a re-fold necessary.
    """
    if known is None and core.needs_history(state, fresh):
        # The batch's own entries may already be in the history (a big batch COPYs its log first):
        # the fold counts a repeated fact once.
        known = Known(log.history(conn, key), projections.existing_transitions(conn, key))
    derivation = core.derive(fresh, state, known)
    messages: list[OutboxRow] = []
    again: list[OutboxRow] = []
    revived = projections.emitted_bodies(conn, derivation.revived)
    for transition, historical in revived.values():
        again += policy.rows_for(transition, historical=historical, now=now, linked_user=linked_user)
    for e in derivation.folded if every_message else derivation.new:
        if e.transition.id in revived:
            continue
        rows = policy.rows_for(e.transition, historical=e.historical, now=now, linked_user=linked_user)
        (again if every_message else messages).extend(rows)
    return Derived(derivation, messages, again)


def stage(work: UnitOfWork, derived: Derived, *, state: bool = True, again: Sequence[OutboxRow] | None = None
          ) -> None:
    """Stage a derivation's writes: the state (unless `state` is false: a replay that found it
    equal), new transitions, superseded and revived ids (whose undelivered messages are withdrawn
    or queued again), and its messages (`again`: only these of the ones that may exist)."""
    d = derived.derivation
    if state:
        work.stage_state(d.state, d.last_position)
    work.transitions.extend((e.transition, e.position, e.historical) for e in d.new)
    work.superseded.extend(d.superseded)
    work.revived.extend(d.revived)
    work.outbox.extend(derived.messages)
    work.outbox_if_missing.extend(derived.again if again is None else again)
