"""Verify: the log's hash chain is intact and every projection equals a fresh fold of the log.

The chain is recomputed exactly as `store.log.plan` computed it (`core.chain.entry_for_hash`
over the stored columns, then `chain_hash` with the previous entry's stored hash), so an edited
entry, an edited hash or a missing position is named by its position. Each entry is checked
against its predecessor's *stored* hash, which pins a problem to the entry that has it rather
than to everything after it.

The columns the hash does not cover are denormalised copies of the hashed facts (`kind`,
`app_user_id`, `environment`, `occurred_at`: readers filter, resolve subscribers and sort by
them); each is re-derived from the facts (`core.chain.derived_columns`) and compared, so an
owner who switches the trigger off and edits one is named by position and column. Logs written
before this check existed verify unchanged: the hash format is the same.

A partitioned log (`[log] chains = N`, store/log.py) is walked in the same single pass: one running
hash per chain, each entry checked against the previous entry *of its chain*, each chain's positions
advancing by exactly N (a missing entry is a gap in its chain), each entry in the chain its
subscription key hashes to, each epoch's seal equal to the one recomputed from the chains it closed,
and each current head equal to the end of its chain. Problems then name the chain; a log that has
only ever had one chain is checked and reported exactly as before.

Everything streams through server-side cursors inside one read-only REPEATABLE READ transaction:
memory stays flat whatever the log's size, and the chain, the head and the projections are all
read from one snapshot, so a concurrent ingest can never look like damage.

The projections and transitions are compared with the derive step that ingest and replay write
by (`core.derive.derive` over the whole history): a state the fold does not produce, a transition
it would emit (missing), one it would supersede (not superseded) or revive (superseded but live)
is a problem here exactly when a replay would change it. Verify itself never writes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from subledger.core.chain import (
    DERIVED_COLUMNS,
    chain_hash,
    chain_of,
    derived_columns,
    entry_for_hash,
    first_positions,
    respellings,
    seal,
)
from subledger.core.derive import Known, Located, derive
from subledger.core.errors import InvalidEvent
from subledger.core.events import event_from_facts, format_time
from subledger.core.lifecycle import TransitionKind, subscriber_id, transition_id
from subledger.store import log, rollups

FETCH = 2000
MAX_PROBLEMS = 50

CHAIN_SQL = """
SELECT position, source, external_id, app_id, subscription_key, received_at, historical, raw, facts, hash,
  arrival, kind, app_user_id, environment, occurred_at
FROM event_log ORDER BY position
"""
HISTORY_SQL = """
SELECT subscription_key, position, historical, facts FROM event_log WHERE subscription_key IS NOT NULL
ORDER BY subscription_key, position
"""
PROJECTIONS_SQL = "SELECT key, app_user_id, status, state, app_id, expires_at FROM subscriptions ORDER BY key"
# The projection's columns beside `state` that readers filter on (audit resolves app users, the
# scheduler finds due periods by status and expires_at): each must equal the state it copies.
PROJECTION_COLUMNS = ("app_user_id", "status", "app_id", "expires_at")
# Beside which ids exist, the columns of each transition that readers use (the audit resolves a
# subscriber and follows log_position to the causing entry) and the body fields that name them.
TRANSITIONS_SQL = """
SELECT subscription_key, id, superseded_at IS NOT NULL, kind, app_id, subscriber, occurred_at, log_position, historical,
  body->>'id', body->>'kind', body->>'subscription_key', body->>'app_id', body->>'event_source', body->>'event_id',
  body->>'occurred_at', body->>'app_user_id'
FROM transitions ORDER BY subscription_key
"""


@dataclass(frozen=True, slots=True)
class Problem:
    """`kind`: chain, head, projection, transition or rollup; `position` for the log, `subscription`
    for a projection or transition.

    `column` names the column that disagrees when one can be named (a derived log column, or a
    projection column), so a reader of `--json` need not parse `detail`. `chain` names the chain of a
    chain or head problem when the log is partitioned (None for a log that has only had one).
    """

    kind: str
    detail: str
    position: int | None = None
    subscription: str | None = None
    column: str | None = None
    chain: int | None = None

    def describe(self) -> str:
        if self.kind in ("head", "rollup"):
            return f"{self.kind}: {self.detail}"
        where = f"position {self.position}" if self.position is not None else f"subscription {self.subscription}"
        return f"{self.kind} at {where}: {self.detail}"


@dataclass
class Verification:
    entries: int = 0
    subscriptions: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first_bad_position(self) -> int | None:
        return next((p.position for p in self.problems if p.position is not None), None)

    def add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "subscriptions": self.subscriptions,
            "first_bad_position": self.first_bad_position,
            "problem_count": self.problem_count,
            "problems": [
                {"kind": p.kind, "position": p.position, "subscription": p.subscription, "column": p.column,
                 "chain": p.chain, "detail": p.detail}
                for p in self.problems
            ],
        }


Progress = Callable[[str, int], None]


def _stream(conn: psycopg.Connection, name: str, sql: str) -> Iterator[tuple[Any, ...]]:
    with conn.cursor(name=name) as cur:
        cur.itersize = FETCH
        # orjson, on these cursors only: faster than json.loads, and it reads a number beyond 64 bits
        # (only a float can have been written so) back as the float the append hashed
        set_json_loads(orjson.loads, cur)
        cur.execute(sql)
        yield from cur


def verify(conn: psycopg.Connection, *, progress: Progress | None = None) -> Verification:
    """Check chain, head and projections in one snapshot; never writes."""
    result = Verification()
    conn.rollback()
    previous_isolation = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        conn.read_only = True
        try:
            _verify_chain(conn, result, progress)
            _verify_projections(conn, result, progress)
            _verify_rollups(conn, result)
        finally:
            conn.rollback()
            conn.read_only = False
    finally:
        conn.isolation_level = previous_isolation
    return result


def _verify_rollups(conn: psycopg.Connection, result: Verification) -> None:
    """The counts the overview and `audit stats` read (store/rollups.py) equal a fresh count of
    their tables, in the same snapshot as the chain: a trigger switched off, or a rollup edited,
    is named by table and group."""
    for d in rollups.drift(conn):
        result.add(Problem("rollup", f"{d.table} {d.what}: kept {d.kept}, the table holds {d.counted}"))


class _Walk:
    """Where each chain of the current epoch stands while the log streams by in position order."""

    def __init__(self, epochs: list[log.Epoch]) -> None:
        self.epochs = epochs
        self.index = 0
        self.partitioned = any(e.chains > 1 for e in epochs)
        self.previous: list[bytes] = []
        self.expected: list[int] = []
        self.start(epochs[0])

    @property
    def epoch(self) -> log.Epoch:
        return self.epochs[self.index]

    def start(self, epoch: log.Epoch) -> None:
        self.previous = [epoch.seal] * epoch.chains
        self.expected = [p + epoch.chains for p in first_positions(epoch.first_position, epoch.chains)]

    def where(self, chain: int) -> str:
        """The prefix a problem's detail gets: nothing for a one-chain log."""
        return f"chain {chain}: " if self.partitioned else ""

    def advance_to(self, position: int | None, result: Verification) -> None:
        """Close every epoch that ends before `position` (None: all of them), checking each seal."""
        while self.index + 1 < len(self.epochs) and (
                position is None or position >= self.epochs[self.index + 1].first_position):
            following = self.epochs[self.index + 1]
            if seal(self.previous) != following.seal:
                result.add(Problem("chain", f"epoch {following.epoch} starts from a seal that does not match the "
                                            f"last hashes of epoch {self.epoch.epoch}'s chains (an entry before "
                                            "it, or the seal, was changed)", position=following.first_position))
            self.index += 1
            self.start(following)  # from the stored seal, so one bad seal is not blamed on every entry


def _verify_chain(conn: psycopg.Connection, result: Verification, progress: Progress | None) -> None:
    walk = _Walk(log.epochs(conn))
    for (position, source, external_id, app_id, key, received_at, historical, raw, facts, stored,
         arrival, *columns) in _stream(conn, "subledger_verify_chain", CHAIN_SQL):
        stored = bytes(stored)
        walk.advance_to(position, result)
        epoch = walk.epoch
        chain = (position - epoch.first_position) % epoch.chains
        named = chain if walk.partitioned else None
        expected_position = walk.expected[chain]
        if position != expected_position:
            result.add(Problem("chain", f"{walk.where(chain)}expected position {expected_position}, found {position} "
                                        "(a gap)", position=expected_position, chain=named))
        if epoch.chains > 1 and chain_of(key, epoch.chains) != chain:
            result.add(Problem("chain", f"{walk.where(chain)}{source}:{external_id}: its subscription key belongs to "
                                        f"chain {chain_of(key, epoch.chains)}", position=position, chain=named,
                               column="subscription_key"))
        previous = walk.previous[chain]
        entry = entry_for_hash(
            source=source, external_id=external_id, app_id=app_id, subscription_key=key or "",
            received_at=format_time(received_at), historical=bool(historical), raw=bytes(raw), facts=facts,
            arrival=arrival,
        )
        if chain_hash(previous, entry) != stored and not any(
            chain_hash(previous, {**entry, "facts": respelt}) == stored for respelt in respellings(facts)
        ):
            result.add(Problem("chain", f"{walk.where(chain)}{source}:{external_id}: the stored hash does not match "
                                        "the entry (the entry or its hash was changed)", position=position,
                               chain=named))
        _check_derived(result, position, f"{source}:{external_id}", key, facts, columns)
        walk.previous[chain], walk.expected[chain] = stored, position + epoch.chains
        result.entries += 1
        if progress is not None and result.entries % FETCH == 0:
            progress("chain", FETCH)
    walk.advance_to(None, result)
    _verify_heads(conn, walk, result)


def _verify_heads(conn: psycopg.Connection, walk: _Walk, result: Verification) -> None:
    """Each chain of the current epoch must end where its head says."""
    stored = log.heads(conn)
    chains = walk.epoch.chains
    for chain in range(chains):
        end = (walk.expected[chain] - chains, walk.previous[chain])
        if not walk.partitioned:
            if 0 not in stored:
                result.add(Problem("head", "log_head row is missing"))
            elif stored[0] != end:
                result.add(Problem("head", f"log_head says position {stored[0][0]}, the log ends at {end[0]} "
                                           "or with another hash"))
        elif chain not in stored:
            result.add(Problem("head", f"chain {chain}'s head row is missing", chain=chain))
        elif stored[chain] != end:
            result.add(Problem("head", f"chain {chain}'s head says position {stored[chain][0]}, the chain ends at "
                                       f"{end[0]} or with another hash", chain=chain))


def _check_derived(
    result: Verification, position: int, name: str, key: str | None, facts: Any, stored: list[Any]
) -> None:
    """The unhashed columns must be what the append derived from the (hashed) facts."""
    if key == "":
        # the hash covers `subscription_key or ""`; the append stores "no subscription" as NULL
        result.add(Problem("chain", f"{name}: column subscription_key is '' (the append stores none as NULL)",
                           position=position, column="subscription_key"))
    try:
        derived = derived_columns(facts)
    except (InvalidEvent, KeyError, TypeError, ValueError, AttributeError) as exc:
        result.add(Problem("chain", f"{name}: the facts no longer state the entry's columns ({exc})",
                           position=position, column="facts"))
        return
    if derived == tuple(stored):
        return
    for column, want, have in zip(DERIVED_COLUMNS, derived, stored, strict=True):
        if want != have:
            result.add(Problem("chain", f"{name}: column {column} is {_shown(have)} but the hashed facts say "
                                        f"{_shown(want)} (the column was changed)", position=position, column=column))


def _shown(value: Any) -> str:
    """A stored value for a one-line report: times as RFC 3339, long text cut short."""
    if isinstance(value, datetime):
        return format_time(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _verify_projections(conn: psycopg.Connection, result: Verification, progress: Progress | None) -> None:
    """Merge three key-ordered streams: the log's facts, the projections, the transitions."""
    logged = itertools.groupby(_stream(conn, "subledger_verify_log", HISTORY_SQL), key=lambda r: r[0])
    projected = _stream(conn, "subledger_verify_projections", PROJECTIONS_SQL)
    emitted = itertools.groupby(_stream(conn, "subledger_verify_transitions", TRANSITIONS_SQL), key=lambda r: r[0])
    projection = next(projected, None)
    transitions = next(emitted, None)
    for key, rows in logged:
        try:
            located = [Located(event_from_facts(f), int(position), bool(historical))
                       for _, position, historical, entry in rows for f in entry["events"]]
        except (InvalidEvent, KeyError, TypeError, ValueError) as exc:
            located = []
            result.add(Problem("projection", f"the log's facts no longer parse: {exc}", subscription=key))
        while projection is not None and projection[0] < key:
            result.add(Problem("projection", "a projection with no facts in the log", subscription=projection[0]))
            projection = next(projected, None)
        stored_transitions: list[tuple[Any, ...]] = []
        while transitions is not None and transitions[0] < key:
            transitions = next(emitted, None)
        if transitions is not None and transitions[0] == key:
            stored_transitions = list(transitions[1])
            transitions = next(emitted, None)
        ids = {row[1]: row[2] for row in stored_transitions}
        result.subscriptions += 1
        if progress is not None and result.subscriptions % 500 == 0:
            progress("projections", 500)
        if not located:
            continue
        derived = derive((), None, Known(located, ids))
        if projection is None or projection[0] != key:
            result.add(Problem("projection", "missing: the log has facts but no projection", subscription=key))
        else:
            _, app_user_id, status, state, app_id, expires_at = projection
            fresh = derived.state.to_json()
            if state != fresh:
                fields = sorted(k for k in set(state) | set(fresh) if state.get(k) != fresh.get(k))
                result.add(Problem("projection", f"differs from a fresh fold in {', '.join(fields)}",
                                   subscription=key))
            else:
                stored = (app_user_id, status, app_id, None if expires_at is None else format_time(expires_at))
                wrong = [c for c, have in zip(PROJECTION_COLUMNS, stored, strict=True) if have != fresh[c]]
                if wrong:
                    said = f"columns {', '.join(wrong)} disagree" if len(wrong) > 1 else f"column {wrong[0]} disagrees"
                    result.add(Problem("projection", f"{said} with the state", subscription=key, column=wrong[0]))
            projection = next(projected, None)
        missing = sorted(e.transition.id for e in derived.new)
        stale = sorted(derived.superseded)
        revived = sorted(derived.revived)
        for label, found in (("missing", missing), ("not superseded", stale), ("superseded but live", revived)):
            if found:
                result.add(Problem("projection", f"transitions {label}: {', '.join(found[:3])}", subscription=key))
        _check_transitions(result, key, located, stored_transitions)
    while projection is not None:
        result.add(Problem("projection", "a projection with no facts in the log", subscription=projection[0]))
        projection = next(projected, None)


TRANSITION_COLUMNS = ("id", "kind", "subscription_key", "app_id", "subscriber", "occurred_at", "log_position",
                      "historical")


def _check_transitions(
    result: Verification, key: str, located: list[Located], rows: list[tuple[Any, ...]]
) -> None:
    """Each stored transition must agree with the log it was derived from, column by column.

    No fresh-fold comparison of the body (a transition keeps the body it was emitted with when a
    later fact re-folds the history), only what is fixed once the causing fact is: its id is a
    digest of (subscription, causing fact, kind); the causing fact is in this subscription's log,
    at `log_position`, with its `occurred_at` and the entry's `historical` flag; the app user is
    one that a fact of this subscription named, and `subscriber` is that user or `anon:<key>`.
    """
    if not rows:
        return
    origin: dict[tuple[str, str], list[tuple[int, bool, datetime]]] = {}
    for fact in located:
        origin.setdefault((fact.event.source.value, fact.event.id), []).append(
            (fact.position, fact.historical, fact.event.occurred_at))
    users = {f.event.app_user_id for f in located if f.event.app_user_id}
    app_id = located[0].event.app_id if located else None
    for (_, tid, _, kind, t_app, subscriber, occurred_at, log_position, historical,
         b_id, b_kind, b_key, b_app, b_source, b_event, b_occurred, b_user) in rows:
        wrong: list[str] = []
        if b_id != tid:
            wrong.append("id")
        if b_kind != kind:
            wrong.append("kind")
        if b_key != key:
            wrong.append("subscription_key")
        if tid != transition_id(key, b_source, b_event, kind):
            # the id digests (subscription, causing fact, kind): name the kind when another one fits
            changed_kind = any(transition_id(key, b_source, b_event, k) == tid for k in TransitionKind)
            wrong.append("kind" if changed_kind else "id")
        if t_app != app_id or b_app != t_app:
            wrong.append("app_id")
        if (b_user is not None and b_user not in users) or subscriber != subscriber_id(b_user, key):
            wrong.append("subscriber")
        causes = origin.get((b_source, b_event), [])
        if not any(c[2] == occurred_at for c in causes) or b_occurred != format_time(occurred_at):
            wrong.append("occurred_at")
        cause = next((c for c in causes if c[0] == log_position), None)
        if cause is None:
            wrong.append("log_position")
        elif cause[1] != historical:
            wrong.append("historical")
        if wrong:
            columns = sorted(set(wrong), key=TRANSITION_COLUMNS.index)
            said = f"columns {', '.join(columns)} disagree" if len(columns) > 1 else f"column {columns[0]} disagrees"
            result.add(Problem("transition", f"transition {tid}: {said} with the log", subscription=key,
                               column=columns[0]))


def sizes(conn: psycopg.Connection) -> tuple[int, int]:
    """(log entries, projections) for `verify`'s progress bar: read from the heads (and the epochs of a
    partitioned log), and a row count."""
    current = log.epochs(conn)[-1]
    entries = current.entries_before + log.entries_in(current, log.heads(conn))
    projections = conn.execute("SELECT count(*) FROM subscriptions").fetchone()
    conn.rollback()
    return entries, (int(projections[0]) if projections else 0)
