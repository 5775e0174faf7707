"""The write side of the transactional outbox: one transaction per ingest.

Log entries, projections, transitions and outbox rows commit together or not at all; the relay
is woken by a NOTIFY issued in the same transaction, which PostgreSQL delivers only when (and if)
it commits: the hint costs one statement, not a second transaction. Every item of a batch is applied in occurrence
order per subscription, so a shuffled batch yields exactly the transitions of the sorted one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import psycopg

from subledger.core.derive import Located
from subledger.core.lifecycle import is_historical
from subledger.core.sources import Notification
from subledger.outbox.derive import DEFAULT_HORIZON, IngestPolicy, derive, stage
from subledger.store import log, unit_of_work
from subledger.store import outbox as outbox_sql
from subledger.store.unit_of_work import SMALL_BATCH, UnitOfWork

__all__ = ["DEFAULT_HORIZON", "SMALL_BATCH", "Incoming", "IngestPolicy", "Outcome", "ingest", "wake_relay"]

@dataclass(frozen=True)
class Incoming:
    notification: Notification
    raw: bytes
    historical: bool = False
    # push (a webhook), reconciliation (recovered from a store's API) or import (core/chain.ARRIVALS)
    arrival: str = "push"


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
    work = UnitOfWork(now, wake=notify)  # the relay's NOTIFY rides in the transaction, delivered at commit
    by_position: dict[int, list[str]] = defaultdict(list)
    with conn.transaction():
        entries = [
            log.Entry(
                notification=item.notification,
                raw=item.raw,
                received_at=now,
                historical=item.historical or _is_history(item.notification, now, _horizon(item, policy)),
                arrival=item.arrival,
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
        by_key: dict[str, list[Located]] = defaultdict(list)
        for event, entry in log.events_of(appended):
            by_key[event.subscription_key].append(Located(event, entry.position, entry.entry.historical))
        for key, fresh in by_key.items():
            derived = derive(conn, key, fresh, policy, now, state=stored.get(key), linked_user=links.get(key))
            stage(work, derived)
            for e in derived.derivation.new:
                by_position[e.position].append(e.transition.id)
        if fail_at:
            fail_at("after_derive")
        work.commit(conn)
        if fail_at:
            fail_at("before_commit")
    return [
        Outcome(r.entry.notification.source.value, r.entry.notification.external_id, "new", r.position,
                tuple(by_position.get(r.position, ())))
        if isinstance(r, log.Appended)
        else Outcome(r.entry.notification.source.value, r.entry.notification.external_id, "duplicate")
        for r in results
    ]


def _horizon(item: Incoming, policy: IngestPolicy) -> timedelta:
    """The publishing rule's one home: which horizon makes `item` history.

    A fact recovered by reconciliation is news to subledger however old it is (the push channel
    lost it; nothing downstream has heard of it), so it is published with its true occurred_at up
    to `policy.reconciliation_horizon` (30 days unless configured); beyond that it is history like
    any other old fact. Never shorter than the push horizon, so recovering a fact cannot demote it.
    """
    if item.arrival == "reconciliation":
        return max(policy.horizon, policy.reconciliation_horizon)
    return policy.horizon


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
