"""The write side of the transactional outbox: one transaction per ingest.

Log entries, projections, transitions and outbox rows commit together or not at all; the relay
is woken by a NOTIFY sent only after the commit. Every item of a batch is applied in occurrence
order per subscription, so a shuffled batch yields exactly the transitions of the sorted one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import psycopg

from subledger.core.events import CanonicalEvent
from subledger.core.lifecycle import (
    SubscriptionState,
    Transition,
    advance,
    fold,
    is_historical,
    needs_refold,
    reconcile,
)
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox import writer
from subledger.store import log, projections, unit_of_work
from subledger.store import outbox as outbox_sql
from subledger.store.unit_of_work import SMALL_BATCH, UnitOfWork

__all__ = ["SMALL_BATCH", "Incoming", "IngestPolicy", "Outcome", "ingest", "wake_relay"]

DEFAULT_HORIZON = timedelta(hours=72)


@dataclass(frozen=True)
class IngestPolicy:
    """What the ingest transaction needs from the configuration."""

    destinations: Mapping[str, tuple[Destination, ...]] = field(default_factory=dict)
    horizon: timedelta = DEFAULT_HORIZON
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
    ) -> list[outbox_sql.OutboxRow]:
        """The outbox rows of `transition` (for every configured destination unless named), due per `due_at`."""
        return writer.rows_for(
            transition,
            self.destinations_for(transition.app_id) if destinations is None else destinations,
            historical=historical,
            available_at=self.due_at(transition.app_id, now),
            linked_user=linked_user,
        )


@dataclass(frozen=True)
class Incoming:
    notification: Notification
    raw: bytes
    historical: bool = False


@dataclass(frozen=True)
class Outcome:
    source: str
    external_id: str
    result: Literal["new", "duplicate"]
    position: int | None = None
    transitions: tuple[str, ...] = ()


FailureHook = Callable[[str], None]


def ingest(
    conn: psycopg.Connection,
    items: Sequence[Incoming],
    policy: IngestPolicy,
    now: datetime,
    *,
    fail_at: FailureHook | None = None,
    notify: bool = True,
) -> list[Outcome]:
    """Append, fold, render and enqueue `items` in one transaction; return one outcome per item.

    The rows are staged in a unit of work (store/unit_of_work.py): a small batch (a webhook, an API
    call) is then BEGIN, two statements and COMMIT, a big one (a file import) COPYs each table.
    """
    work = UnitOfWork(now)
    by_position: dict[int, list[str]] = defaultdict(list)
    with conn.transaction():
        entries = [
            log.Entry(
                notification=item.notification,
                raw=item.raw,
                received_at=now,
                historical=item.historical or _is_history(item.notification, now, policy.horizon),
            )
            for item in items
        ]
        keys = sorted({k for item in items if (k := item.notification.key()) is not None})
        begun = unit_of_work.begin(
            conn, entries, keys,
            sorted({(i.notification.app_id, k) for i in items if (k := i.notification.key()) is not None}),
        )
        stored, links = begun.states, begun.links
        results, log_writes = log.plan(entries, begun.head)
        work.append(conn, log_writes)
        if fail_at:
            fail_at("after_log_insert")
        appended = [r for r in results if isinstance(r, log.Appended)]
        by_key: dict[str, list[tuple[CanonicalEvent, log.Appended]]] = defaultdict(list)
        for event, entry in log.events_of(appended):
            by_key[event.subscription_key].append((event, entry))
        for key, pairs in by_key.items():
            _derive(conn, key, pairs, stored.get(key), policy, now, work, by_position, links.get(key))
        if fail_at:
            fail_at("after_derive")
        work.commit(conn)
        if fail_at:
            fail_at("before_commit")
    if notify and (work.outbox or work.outbox_if_missing):
        wake_relay(conn)
    return [
        Outcome(r.entry.notification.source.value, r.entry.notification.external_id, "new", r.position,
                tuple(by_position.get(r.position, ())))
        if isinstance(r, log.Appended)
        else Outcome(r.entry.notification.source.value, r.entry.notification.external_id, "duplicate")
        for r in results
    ]


def _is_history(notification: Notification, now: datetime, horizon: timedelta) -> bool:
    """Rule 5, for every source the same way.

    A scheduler-inferred expiration is dated at the end of the period it closes, so one inferred for
    a period that ended before the horizon (old history imported, then the scheduler ran) is history
    like any other old fact and is not published; one inferred on time (period end + grace) is news.
    """
    return any(is_historical(e.occurred_at, now, horizon) for e in notification.events)


def wake_relay(conn: psycopg.Connection) -> None:
    """NOTIFY after commit: a hint only; the relay also polls, so a lost one only delays."""
    with conn.transaction():
        outbox_sql.notify(conn)


def _derive(
    conn: psycopg.Connection,
    key: str,
    pairs: list[tuple[CanonicalEvent, log.Appended]],
    state: SubscriptionState | None,
    policy: IngestPolicy,
    now: datetime,
    batch: UnitOfWork,
    by_position: dict[int, list[str]],
    linked_user: str | None = None,
) -> None:
    events = [event for event, _ in pairs]
    origin = {(e.source.value, e.id): (entry.position, entry.entry.historical) for e, entry in pairs}
    last_position = max(entry.position for _, entry in pairs)
    if state is None or not needs_refold(state, events):
        start = state or SubscriptionState.empty(min(events, key=lambda e: e.occurred_at))
        result = advance(start, events)
        emitted = result.transitions
        new_state = result.state
    else:
        # Rule 3: a late event re-folds the whole history; ids decide what is new or superseded.
        # The batch's own entries may not be written yet (small batches write at the end); the
        # fold drops the repeat when they are.
        history = log.history(conn, key)
        origin.update({(h.event.source.value, h.event.id): (h.position, h.historical) for h in history})
        refolded = fold([h.event for h in history] + events)
        diff = reconcile(projections.existing_transitions(conn, key), refolded.transitions)
        emitted = diff.new
        new_state = refolded.state
        batch.superseded.extend(diff.superseded)
        batch.revived.extend(diff.revived)
        for transition, historical in projections.emitted_bodies(conn, diff.revived).values():
            batch.outbox.extend(_rows(transition, historical, policy, now, linked_user))
    batch.stage_state(new_state, last_position)
    for transition in emitted:
        position, historical = origin[(transition.event_source, transition.event_id)]
        batch.transitions.append((transition, position, historical))
        by_position[position].append(transition.id)
        batch.outbox.extend(_rows(transition, historical, policy, now, linked_user))


def _rows(
    transition: Transition, historical: bool, policy: IngestPolicy, now: datetime, linked_user: str | None = None
) -> list[outbox_sql.OutboxRow]:
    return policy.rows_for(transition, historical=historical, now=now, linked_user=linked_user)
