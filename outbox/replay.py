"""Replay: rebuild projections, transitions and missing outbox rows from the log (rule 1).

The log is the truth and everything else is a cache of its fold, so a rebuild is the ingest's own
re-fold path run over every subscription: `core.lifecycle.fold` and `reconcile` decide, the store's
projection and transition writers and `outbox.writer.rows_for` / `insert_missing` write. Ids are
deterministic (rule 2), so on an unchanged log a replay finds every transition and every messageId
already there and creates nothing; it can never produce a second message for one fact.

Each batch of subscriptions is rebuilt in one transaction holding the chain head row lock
(`log_head FOR UPDATE`), the lock every appender takes, so a replay never interleaves with an
ingest of the same subscriptions: it sees a whole ingest or none of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from subledger.core.lifecycle import SubscriptionState, Transition, fold, reconcile
from subledger.outbox.ingest import IngestPolicy
from subledger.store import identity, projections, streams
from subledger.store import outbox as outbox_sql
from subledger.store.log import LoggedEvent

BATCH = 500
LOCK_HEAD = "SELECT position FROM log_head FOR UPDATE"


@dataclass
class Change:
    """What a replay changes (or, dry, would change) for one subscription."""

    subscription_key: str
    state: str | None = None  # "missing" or "differs"
    new_transitions: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    revived: list[str] = field(default_factory=list)
    new_messages: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.state or self.new_transitions or self.superseded or self.revived or self.new_messages)

    def lines(self) -> list[str]:
        out = [f"{self.subscription_key}: projection {self.state}"] if self.state else []
        out += [f"{self.subscription_key}: + transition {t}" for t in self.new_transitions]
        out += [f"{self.subscription_key}: ~ supersede {t}" for t in self.superseded]
        out += [f"{self.subscription_key}: ~ revive {t}" for t in self.revived]
        out += [f"{self.subscription_key}: + message {m}" for m in self.new_messages]
        return out


@dataclass
class Report:
    subscriptions: int = 0
    states: int = 0
    transitions: int = 0
    superseded: int = 0
    revived: int = 0
    messages: int = 0
    changed: int = 0  # subscriptions with any difference; `changes` keeps the first of them
    changes: list[Change] = field(default_factory=list)
    dry_run: bool = False

    def add(self, change: Change, *, keep: int) -> None:
        self.states += 1 if change.state else 0
        self.transitions += len(change.new_transitions)
        self.superseded += len(change.superseded)
        self.revived += len(change.revived)
        self.messages += len(change.new_messages)
        self.changed += 1
        if len(self.changes) < keep:
            self.changes.append(change)

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "subscriptions": self.subscriptions,
            "states": self.states,
            "transitions": self.transitions,
            "superseded": self.superseded,
            "revived": self.revived,
            "messages": self.messages,
            "changed_subscriptions": self.changed,
            "changes": [line for c in self.changes for line in c.lines()],
        }


Progress = Callable[[int], None]


def total_subscriptions(conn: psycopg.Connection) -> int:
    """For the progress bar: the projection's row count (the log's distinct keys would cost a scan)."""
    row = conn.execute("SELECT count(*) FROM subscriptions").fetchone()
    return int(row[0]) if row else 0


def replay(
    conn: psycopg.Connection,
    policy: IngestPolicy,
    now: datetime,
    *,
    subscription: str | None = None,
    dry_run: bool = False,
    batch: int = BATCH,
    progress: Progress | None = None,
    keep_changes: int = 1000,
) -> Report:
    """Rebuild every subscription (or one) from the log; with `dry_run`, only report what would change."""
    report = Report(dry_run=dry_run)
    after = ""
    while True:
        with conn.transaction():
            conn.execute(LOCK_HEAD)
            keys = [subscription] if subscription is not None else streams.next_keys(conn, after, batch)
            changes = _rebuild(conn, keys, policy, now, dry_run=dry_run) if keys else []
        for change in changes:
            report.subscriptions += 1
            if change:
                report.add(change, keep=keep_changes)
        if progress is not None and keys:
            progress(len(keys))
        if subscription is not None or not keys:
            return report
        after = keys[-1]


@dataclass
class _Writes:
    states: list[tuple[SubscriptionState, int]] = field(default_factory=list)
    transitions: list[tuple[Transition, int, bool]] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    revived: list[str] = field(default_factory=list)
    rows: list[tuple[str, outbox_sql.OutboxRow]] = field(default_factory=list)  # (subscription key, row)


def _rebuild(
    conn: psycopg.Connection, keys: Sequence[str], policy: IngestPolicy, now: datetime, *, dry_run: bool
) -> list[Change]:
    logged = streams.histories(conn, keys)
    stored = streams.stored_states(conn, keys)
    emitted = streams.emitted(conn, keys)
    keys = [k for k in keys if logged.get(k)]
    links = identity.links_for(conn, [(logged[k][0].event.app_id, k) for k in keys])
    writes = _Writes()
    changes: dict[str, Change] = {}
    for key in keys:
        changes[key] = _plan(key, logged[key], stored.get(key), emitted.get(key, {}), policy, now,
                             links.get(key), writes)
    # Only messageIds in neither the outbox nor the delivered record are new (rule 2: ids repeat).
    present = streams.existing_messages(conn, [r.message_id for _, r in writes.rows])
    missing = [(key, r) for key, r in writes.rows if r.message_id not in present]
    for key, row in missing:
        changes[key].new_messages.append(row.message_id)
    if not dry_run:
        projections.save_states(conn, writes.states, now)
        projections.insert_transitions(conn, writes.transitions, now, copy=False)
        projections.mark_superseded(conn, writes.superseded, now)
        outbox_sql.withdraw(conn, writes.superseded, now)
        projections.revive(conn, writes.revived)
        outbox_sql.insert_missing(conn, [r for _, r in missing], now)
    return list(changes.values())


def _plan(
    key: str,
    logged: list[LoggedEvent],
    stored: tuple[dict[str, Any], int] | None,
    emitted: dict[str, bool],
    policy: IngestPolicy,
    now: datetime,
    linked_user: str | None,
    writes: _Writes,
) -> Change:
    """Fold one subscription and compare with what is stored; queue the writes that make them agree."""
    change = Change(key)
    origin = {(h.event.source.value, h.event.id): (h.position, h.historical) for h in logged}
    folded = fold([h.event for h in logged])
    last_position = max(h.position for h in logged)
    if stored is None:
        change.state = "missing"
    elif stored[0] != folded.state.to_json():
        change.state = "differs"
    if change.state:
        writes.states.append((folded.state, last_position))
    diff = reconcile(emitted, folded.transitions)
    for transition in diff.new:
        position, historical = origin[(transition.event_source, transition.event_id)]
        writes.transitions.append((transition, position, historical))
        change.new_transitions.append(transition.id)
    change.superseded.extend(diff.superseded)
    change.revived.extend(diff.revived)
    writes.superseded.extend(diff.superseded)
    writes.revived.extend(diff.revived)
    destinations = policy.destinations_for(folded.state.app_id)
    for transition in folded.transitions:
        _, historical = origin[(transition.event_source, transition.event_id)]
        for row in policy.rows_for(transition, historical=historical, now=now, linked_user=linked_user,
                                   destinations=destinations):
            writes.rows.append((key, row))
    return change
