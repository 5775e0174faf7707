"""A unit of work: one transaction's rows, staged, then written by the cheapest path at commit.

An ingest (and a replay) first decides everything it will write, then writes each table once.
Two ways in, chosen by size:

- Small batches (a webhook, an API call: at most `SMALL_BATCH` entries) are BEGIN, two statements
  and COMMIT. `begin` is one statement (migration 0010's `subledger_ingest_begin`): it locks the
  heads of the batch's chains (only those: ingests of other chains go on meanwhile), finds which
  keys are already logged, locks the batch's subscription states and reads identity links. The
  commit is one statement: a chain of data-modifying CTEs, one part per table, with one JSON
  parameter. That costs the client one `orjson.dumps` instead of adapting
  dozens of arrays (that adaptation cost more than the inserts did).
- Big batches (file imports) COPY each table: COPY is the fastest way in for thousands of rows,
  but costs round trips to set up that a handful of rows would not win back. The log goes in at
  once, as soon as it is chained (`append`), so the rest of the transaction sees it.

(A psycopg pipeline measured slower for the small case: two statements leave it little to save,
and its bookkeeping costs more client CPU than the round trips it spares.)

The SQL of each table stays with the table's one writer (store/log.py, store/projections.py,
store/outbox.py), each giving both encodings; this module only stages and picks. The rare
writes (superseding, withdrawing, reviving, messages that may already exist) are their own
statements on both paths. tests/test_unit_of_work.py shows both paths write the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.chain import chain_slot
from subledger.core.lifecycle import SubscriptionState, Transition
from subledger.store import log, projections
from subledger.store import outbox as outbox_sql
from subledger.store.log import LogWrites
from subledger.store.outbox import OutboxRow

SMALL_BATCH = 32


@dataclass(frozen=True, slots=True)
class Begun:
    head: log.Head
    states: dict[str, SubscriptionState]
    links: dict[str, str]


def begin(
    conn: psycopg.Connection,
    entries: Sequence[log.Entry],
    keys: Sequence[str],
    link_pairs: Iterable[tuple[str, str]],
) -> Begun:
    """Start an ingest in one round trip: the locked heads of the entries' chains (with which of
    `entries` are already logged), the locked states of `keys` and the identity links of the
    (app_id, key) pairs. The server picks the chains (`slot % chains` of the current epoch) and locks
    their heads in ascending order, so two ingests never wait on each other in a cycle."""
    param = {
        "entries": [{"source": e.key[0], "external_id": e.key[1]} for e in entries],
        "slots": sorted({chain_slot(e.notification.key()) for e in entries}),
        "keys": list(keys),
        "links": [{"app_id": app_id, "store_subscription": key} for app_id, key in link_pairs],
    }
    row = conn.execute("SELECT * FROM subledger_ingest_begin(%s::jsonb)", (orjson.dumps(param).decode(),)).fetchone()
    assert row is not None, "run `subledger db upgrade`"
    chains, head_chains, positions, hashes, seen, states, links = row
    tips = {int(c): (int(p), bytes(h)) for c, p, h in zip(head_chains, positions, hashes, strict=True)}
    return Begun(
        head=log.Head(tips, frozenset(tuple(k.split("\x1f", 1)) for k in seen), int(chains)),
        states={key: SubscriptionState.from_json(state) for key, state in states.items()},
        links=dict(links),
    )


_PARTS = (*log.CTE, projections.STATES_CTE, projections.TRANSITIONS_CTE, outbox_sql.CTE)
# One constant text, so the server prepares it once per connection whatever the batch holds.
WRITE_ALL = (
    "WITH d AS (SELECT %s::jsonb AS j),\n"
    + ",\n".join(f"{name} AS ({sql.strip()})" for name, sql in _PARTS)
    + "\n" + outbox_sql.NOTIFY_IN_CTE
)


@dataclass
class UnitOfWork:
    """The rows of one transaction, staged per table; `commit` writes each table once.

    `states` is keyed by subscription, so a subscription staged twice is written once, as last
    staged. `outbox` rows are new by construction (their transitions are); `outbox_if_missing`
    rows are inserted only when their messageId is in neither the outbox nor the delivered record
    (a replay, a revival, a repeated link).
    """

    now: datetime
    log: LogWrites = field(default_factory=LogWrites)
    states: dict[str, tuple[SubscriptionState, int]] = field(default_factory=dict)
    transitions: list[tuple[Transition, int, bool]] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    revived: list[str] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    outbox_if_missing: list[OutboxRow] = field(default_factory=list)
    log_written: bool = False
    # NOTIFY the relays at commit when outbox rows were written (in the one statement when there is one)
    wake: bool = False

    @property
    def size(self) -> int:
        """What the path is chosen by: the batch's entries when it appends, else its subscriptions."""
        return self.log.size or len(self.states)

    @property
    def small(self) -> bool:
        return self.size <= SMALL_BATCH

    def append(self, conn: psycopg.Connection, writes: LogWrites) -> None:
        """Stage the log's rows; a big batch COPYs them now (small ones wait for the one statement)."""
        self.log = writes
        if not self.small:
            log.write(conn, writes, copy=True)
            self.log_written = True

    def stage_state(self, state: SubscriptionState, last_position: int) -> None:
        self.states[state.key] = (state, last_position)

    def commit(self, conn: psycopg.Connection, *, copy: bool | None = None) -> None:
        """Write everything staged, inside the caller's transaction; `copy` forces a path (tests)."""
        use_copy = (not self.small) if copy is None else copy
        wake = self.wake and bool(self.outbox or self.outbox_if_missing)
        projections.mark_superseded(conn, self.superseded, self.now)
        outbox_sql.withdraw(conn, self.superseded, self.now)
        projections.revive(conn, self.revived)
        if use_copy:
            if not self.log_written:
                log.write(conn, self.log, copy=True)
            projections.save_states(conn, self.states.values(), self.now)
            projections.insert_transitions(conn, self.transitions, self.now, copy=True)
            outbox_sql.insert(conn, self.outbox, self.now, copy=True)
        elif (self.log.size and not self.log_written) or self.states or self.transitions or self.outbox:
            _write_all(conn, self, include_log=not self.log_written, wake=wake)
            wake = False
        outbox_sql.insert_missing(conn, self.outbox_if_missing, self.now)
        if wake:
            outbox_sql.notify(conn)


def _write_all(conn: psycopg.Connection, work: UnitOfWork, *, include_log: bool, wake: bool = False) -> None:
    """Everything in one statement with one JSON parameter: one cheap dump for the client, one parse
    for the server (a statement with fifty array parameters costs the client more than the insert)."""
    data: dict[str, Any] = {"now": work.now}
    data.update(log.cte_data(work.log if include_log else LogWrites()))
    data.update(projections.cte_data(work.states.values(), work.transitions))
    data.update(outbox_sql.cte_data(work.outbox))
    if wake:
        data["notify"] = True
    conn.execute(WRITE_ALL, (orjson.dumps(data).decode(),))
