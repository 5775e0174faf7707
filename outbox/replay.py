"""Replay: rebuild projections, transitions and missing outbox rows from the log (rule 1).

The log is the truth and everything else is a cache of its fold, so a rebuild is the ingest's own
derive step (outbox/derive.py) run over every subscription's whole history, asking for the
messages of every live transition; a unit of work writes what differs. Ids are deterministic
(rule 2), so on an unchanged log a replay finds every transition and every messageId already
there and creates nothing; it can never produce a second message for one fact.

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

from subledger.core.derive import Known
from subledger.outbox.derive import Derived, IngestPolicy, derive, stage
from subledger.store import identity, log, projections
from subledger.store import outbox as outbox_sql
from subledger.store.unit_of_work import UnitOfWork

BATCH = 500


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
    return projections.count(conn)


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
            log.lock_head(conn)
            keys = [subscription] if subscription is not None else log.next_keys(conn, after, batch)
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


def _rebuild(
    conn: psycopg.Connection, keys: Sequence[str], policy: IngestPolicy, now: datetime, *, dry_run: bool
) -> list[Change]:
    """Derive each subscription from its whole log and stage what differs from what is stored."""
    logged = log.histories(conn, keys)
    stored = projections.stored_states(conn, keys)
    emitted = projections.emitted(conn, keys)
    keys = [k for k in keys if logged.get(k)]
    links = identity.links_for(conn, [(logged[k][0].event.app_id, k) for k in keys])
    derived: dict[str, Derived] = {
        key: derive(conn, key, (), policy, now, known=Known(logged[key], emitted.get(key, {})),
                    linked_user=links.get(key), every_message=True)
        for key in keys
    }
    # Only messageIds in neither the outbox nor the delivered record are new (rule 2: ids repeat).
    present = outbox_sql.existing_messages(conn, [r.message_id for d in derived.values() for r in d.again])
    work = UnitOfWork(now)
    changes: list[Change] = []
    for key, d in derived.items():
        change = Change(key)
        if key not in stored:
            change.state = "missing"
        elif stored[key][0] != d.derivation.state.to_json():
            change.state = "differs"
        missing = [r for r in d.again if r.message_id not in present]
        change.new_transitions = [e.transition.id for e in d.derivation.new]
        change.superseded = list(d.derivation.superseded)
        change.revived = list(d.derivation.revived)
        change.new_messages = [r.message_id for r in missing]
        stage(work, d, state=change.state is not None, again=missing)
        changes.append(change)
    if not dry_run:
        work.commit(conn)
    return changes
