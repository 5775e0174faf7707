"""The append-only event log: idempotent, hash-chained appends and history reads.

Appenders of a chain serialize on its head row, which makes the chain's positions gapless and in
commit order, lets each hash cover the chain's previous one, and turns a concurrent duplicate (same
subscription, so same chain) into a plain "already there" once the first writer commits.

By default the log is one chain (`log_head`), as it always was. With `[log] chains = N` it is N
chains: an entry's chain is `core.chain.chain_of(subscription key, N)`, chain 0's head is `log_head`
and the others' are `log_heads`. Chain `c` of an epoch starting at position `first` takes positions
`first + c`, `first + c + N`, ...: each head advances by N, so positions stay globally unique and,
within a chain (so within a subscription), increasing in commit order, with no shared counter.
Changing N (`set_chains`) starts an epoch (`log_epochs`) whose chains all begin from the seal of the
old heads; nothing already written changes (docs/scale-out.md).

The one writer of `event_log`, `duplicate_receipts`, `log_head`, `log_heads` and `log_epochs`: `plan` decides the rows,
`write` puts them in by COPY (big batches) and `CTE`/`cte_data` are the same rows as parts of the
unit of work's single statement (small batches, store/unit_of_work.py). Both encodings sit side by
side so they cannot drift; tests/test_unit_of_work.py pins that they write the same rows.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from subledger.core.chain import (
    DEFAULT_ARRIVAL,
    GENESIS,
    chain_hash,
    chain_of,
    entry_for_hash,
    first_positions,
    seal,
)
from subledger.core.derive import Located
from subledger.core.events import CanonicalEvent, event_from_facts, format_time
from subledger.core.sources import Notification
from subledger.store.rows import write_rows

COLUMNS = ("position", "source", "external_id", "app_id", "kind", "subscription_key", "app_user_id",
           "environment", "occurred_at", "received_at", "historical", "raw", "facts", "hash", "arrival")
TYPES = ("int8", "text", "text", "text", "text", "text", "text", "text", "timestamptz", "timestamptz", "bool",
         "bytea", "jsonb", "bytea", "text")


@dataclass(frozen=True, slots=True)
class Entry:
    """A notification ready to append: what the log row will hold."""

    notification: Notification
    raw: bytes
    received_at: datetime
    historical: bool
    arrival: str = DEFAULT_ARRIVAL

    @property
    def key(self) -> tuple[str, str]:
        return (self.notification.source.value, self.notification.external_id)


@dataclass(frozen=True, slots=True)
class Appended:
    position: int
    entry: Entry


@dataclass(frozen=True, slots=True)
class AlreadySeen:
    entry: Entry


Tip = tuple[int, bytes]  # a chain's last position and hash (before its first entry: the epoch's start)


@dataclass(frozen=True, slots=True)
class Head:
    """The heads of the batch's chains, locked for this transaction, and which of the batch's keys are
    already stored. `tips` holds exactly the chains the batch appends to; `chains` is the epoch's N."""

    tips: Mapping[int, Tip]
    seen: frozenset[tuple[str, str]]
    chains: int = 1

    @property
    def position(self) -> int:
        """Chain 0's last position: the log's, when it is one chain."""
        return self.tips[0][0]

    @property
    def hash(self) -> bytes:
        return self.tips[0][1]


def facts_of(notification: Notification) -> dict[str, Any]:
    return {"kind": notification.kind, "events": [event.to_facts() for event in notification.events]}


@dataclass(slots=True)
class LogWrites:
    """The rows an append adds: log entries, duplicate receipts and the chain's new head."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    duplicates: list[tuple[str, str, datetime]] = field(default_factory=list)
    heads: dict[int, Tip] = field(default_factory=dict)  # chain -> its new head, for each chain appended to

    @property
    def head(self) -> Tip | None:
        """Chain 0's new head (the log's, when it is one chain), if the batch appended to it."""
        return self.heads.get(0)

    @property
    def size(self) -> int:
        """How many of the batch's entries this covers (each is a new row or a receipt)."""
        return len(self.rows) + len(self.duplicates)


def plan(entries: Sequence[Entry], head: Head) -> tuple[list[Appended | AlreadySeen], LogWrites]:
    """Chain the entries onto their chains' heads; repeats come back as `AlreadySeen`. Writes nothing."""
    tips = dict(head.tips)
    appended: set[int] = set()
    seen = set(head.seen)
    results: list[Appended | AlreadySeen] = []
    rows: list[tuple[Any, ...]] = []
    duplicates: list[tuple[str, str, datetime]] = []
    for entry in entries:
        key = entry.key
        if key in seen:
            results.append(AlreadySeen(entry))
            duplicates.append((key[0], key[1], entry.received_at))
            continue
        seen.add(key)
        n = entry.notification
        facts = facts_of(n)
        subscription = n.key()
        chain = chain_of(subscription, head.chains) if head.chains > 1 else 0
        position, chained = tips[chain]
        chained = chain_hash(
            chained,
            entry_for_hash(
                source=key[0],
                external_id=key[1],
                app_id=n.app_id,
                subscription_key=subscription or "",
                received_at=format_time(entry.received_at),
                historical=entry.historical,
                raw=entry.raw,
                facts=facts,
                arrival=entry.arrival,
            ),
        )
        position += head.chains
        tips[chain] = (position, chained)
        appended.add(chain)
        first = n.events[0] if n.events else None
        rows.append((
            position, key[0], key[1], n.app_id, n.kind, subscription,
            next((e.app_user_id for e in n.events if e.app_user_id), None),
            first.environment.value if first else None,
            min((e.occurred_at for e in n.events), default=None),
            entry.received_at, entry.historical, entry.raw, orjson.dumps(facts).decode(), chained,
            entry.arrival,
        ))
        results.append(Appended(position, entry))
    return results, LogWrites(rows, duplicates, {c: tips[c] for c in sorted(appended)})


def write(conn: psycopg.Connection, writes: LogWrites, *, copy: bool) -> None:
    write_rows(conn, "event_log", COLUMNS, TYPES, writes.rows, copy=copy)
    if writes.head is not None:
        conn.execute("UPDATE log_head SET position = %s, hash = %s", writes.head)
    others = [(p, h, c) for c, (p, h) in writes.heads.items() if c != 0]
    if others:
        conn.cursor().executemany("UPDATE log_heads SET position = %s, hash = %s WHERE chain = %s", others)
    if writes.duplicates:
        conn.cursor().executemany(
            "INSERT INTO duplicate_receipts (source, external_id, received_at) VALUES (%s, %s, %s)",
            writes.duplicates,
        )


# The same writes as parts of one statement: `WITH d AS (SELECT <json> AS j), name AS (sql), ...`.
CTE = (
    ("new_log", """
  INSERT INTO event_log (position, source, external_id, app_id, kind, subscription_key, app_user_id, environment,
                         occurred_at, received_at, historical, raw, facts, hash, arrival)
  SELECT r.p, r.s, r.e, r.a, r.k, r.sk, r.u, r.env, r.oc, r.rc, r.h, decode(r.raw, 'base64'), r.f,
         decode(r.hs, 'hex'), r.ar
  FROM d, jsonb_to_recordset(d.j->'log') AS r(p int8, s text, e text, a text, k text, sk text, u text, env text,
                                              oc timestamptz, rc timestamptz, h bool, raw text, f jsonb, hs text,
                                              ar text)
"""),
    ("new_head", """
  UPDATE log_head SET position = (d.j->>'head_position')::int8, hash = decode(d.j->>'head_hash', 'hex')
  FROM d WHERE d.j ? 'head_position'
"""),
    ("new_heads", """
  UPDATE log_heads h SET position = r.p, hash = decode(r.hs, 'hex')
  FROM d, jsonb_to_recordset(coalesce(d.j->'heads', '[]')) AS r(c int, p int8, hs text) WHERE h.chain = r.c
"""),
    ("receipts", """
  INSERT INTO duplicate_receipts (source, external_id, received_at)
  SELECT r.s, r.e, r.rc FROM d, jsonb_to_recordset(d.j->'duplicates') AS r(s text, e text, rc timestamptz)
"""),
)


def cte_data(writes: LogWrites) -> dict[str, Any]:
    """`writes` as the keys `CTE` reads from the statement's JSON parameter."""
    data: dict[str, Any] = {
        "log": [
            {"p": p, "s": s, "e": e, "a": a, "k": k, "sk": sk, "u": u, "env": env, "oc": oc, "rc": rc, "h": h,
             "raw": base64.b64encode(raw).decode(), "f": orjson.Fragment(f), "hs": hs.hex(), "ar": ar}
            for p, s, e, a, k, sk, u, env, oc, rc, h, raw, f, hs, ar in writes.rows
        ],
        "duplicates": [{"s": s, "e": e, "rc": rc} for s, e, rc in writes.duplicates],
    }
    if writes.head is not None:
        data["head_position"] = writes.head[0]
        data["head_hash"] = writes.head[1].hex()
    others = [{"c": c, "p": p, "hs": h.hex()} for c, (p, h) in writes.heads.items() if c != 0]
    if others:
        data["heads"] = others
    return data


def lock_head(conn: psycopg.Connection) -> None:
    """Take every lock an appender may take (each chain's head, in chain order, as appenders take
    them), for a rebuild that must not interleave with any ingest."""
    conn.execute("SELECT position FROM log_head FOR UPDATE")
    conn.execute("SELECT chain FROM log_heads ORDER BY chain FOR UPDATE")


# -- chains and epochs ---------------------------------------------------------------------------------

# Taken shared by every ingest's begin (migration 0010) and exclusively by `set_chains`, so a change of
# the number of chains waits for in-flight ingests and no ingest sees it half done.
EPOCH_LOCK = 0x5B1ED6E7


@dataclass(frozen=True, slots=True)
class Epoch:
    """A stretch of the log with one number of chains. Epoch 0 (no row) is the one-chain log every log
    starts as: first position 1, chains starting from the genesis hash."""

    epoch: int
    chains: int
    first_position: int
    seal: bytes
    entries_before: int
    started_at: datetime | None


FIRST_EPOCH = Epoch(0, 1, 1, GENESIS, 0, None)


def epochs(conn: psycopg.Connection) -> list[Epoch]:
    """Every epoch of the log, oldest first (epoch 0 included)."""
    rows = conn.execute(
        "SELECT epoch, chains, first_position, seal, entries_before, started_at FROM log_epochs ORDER BY epoch"
    ).fetchall()
    return [FIRST_EPOCH, *(Epoch(int(e), int(c), int(f), bytes(s), int(b), t) for e, c, f, s, b, t in rows)]


def heads(conn: psycopg.Connection) -> dict[int, Tip]:
    """Every chain head as stored (not locked): chain 0 from `log_head`, the others from `log_heads`."""
    out = {int(c): (int(p), bytes(h)) for c, p, h in conn.execute(
        "SELECT chain, position, hash FROM log_heads ORDER BY chain").fetchall()}
    row = conn.execute("SELECT position, hash FROM log_head").fetchone()
    if row is not None:
        out[0] = (int(row[0]), bytes(row[1]))
    return out


def entries_in(epoch: Epoch, tips: Mapping[int, Tip]) -> int:
    """How many entries `epoch`'s chains hold, read from their heads: each chain's head has advanced
    by `chains` per entry from where the epoch started it."""
    starts = first_positions(epoch.first_position, epoch.chains)
    return sum((tips[c][0] - starts[c]) // epoch.chains for c in range(epoch.chains) if c in tips)


def set_chains(conn: psycopg.Connection, chains: int, now: datetime) -> Epoch | None:
    """Make the log `chains` chains from now on; returns the new epoch, or None when it already is.

    One transaction: wait for in-flight ingests (the epoch lock, exclusively), lock every head,
    seal the closing epoch's heads, record the epoch and start each new chain from the seal. Every
    entry already written stays as it is and verifies against its own epoch.
    """
    if chains < 1:
        raise ValueError("the number of chains must be at least 1")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (EPOCH_LOCK,))
        current = epochs(conn)[-1]
        if current.chains == chains:
            return None
        lock_head(conn)
        tips = heads(conn)
        closing = [tips[c] for c in range(current.chains)]
        first = max(p for p, _ in closing) + 1
        started = Epoch(current.epoch + 1, chains, first, seal([h for _, h in closing]),
                        current.entries_before + entries_in(current, tips), now)
        conn.execute(
            "INSERT INTO log_epochs (epoch, chains, first_position, seal, entries_before, started_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (started.epoch, started.chains, started.first_position, started.seal, started.entries_before, now),
        )
        starts = first_positions(first, chains)
        conn.execute("UPDATE log_head SET position = %s, hash = %s", (starts[0], started.seal))
        conn.execute("DELETE FROM log_heads")
        if chains > 1:
            conn.cursor().executemany(
                "INSERT INTO log_heads (chain, position, hash) VALUES (%s, %s, %s)",
                [(c, starts[c], started.seal) for c in range(1, chains)],
            )
    return started


def contains(conn: psycopg.Connection, source: str, external_id: str) -> bool:
    """Whether the log already holds the entry `(source, external_id)`."""
    found = conn.execute(
        "SELECT 1 FROM event_log WHERE source = %s AND external_id = %s", (source, external_id)
    ).fetchone()
    return found is not None


# A fact with its entry's position and historical flag, as the derive step folds it.
LoggedEvent = Located


def _logged(position: int, historical: bool, facts: dict[str, Any]) -> Iterator[LoggedEvent]:
    for fact in facts["events"]:
        yield LoggedEvent(event_from_facts(fact), int(position), bool(historical))


def history(conn: psycopg.Connection, subscription_key: str) -> list[LoggedEvent]:
    """Every fact of one subscription, as the fold needs them (it sorts them itself): one round
    trip, right for an ingest that re-folds one subscription."""
    rows = conn.execute(
        "SELECT position, historical, facts FROM event_log WHERE subscription_key = %s",
        (subscription_key,),
    ).fetchall()
    return [fact for position, historical, facts in rows for fact in _logged(position, historical, facts)]


NEXT_KEYS_SQL = """
SELECT DISTINCT subscription_key FROM event_log
WHERE subscription_key IS NOT NULL AND subscription_key > %s
ORDER BY subscription_key LIMIT %s
"""
HISTORIES_SQL = """
SELECT subscription_key, position, historical, facts FROM event_log
WHERE subscription_key = ANY(%s) ORDER BY subscription_key, position
"""


def next_keys(conn: psycopg.Connection, after: str, limit: int) -> list[str]:
    """The next `limit` subscription keys of the log after `after`, in key order (keyset paging)."""
    return [r[0] for r in conn.execute(NEXT_KEYS_SQL, (after, limit)).fetchall()]


def histories(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, list[LoggedEvent]]:
    """key → every fact of its log entries, as `history` returns them: a rebuild of the whole log
    (replay) reads hundreds of subscriptions per statement instead of one per round trip."""
    out: dict[str, list[LoggedEvent]] = defaultdict(list)
    for key, position, historical, facts in conn.execute(HISTORIES_SQL, (list(keys),)).fetchall():
        out[key].extend(_logged(position, historical, facts))
    return out


def events_of(entries: Iterable[Appended]) -> Iterable[tuple[CanonicalEvent, Appended]]:
    for appended in entries:
        for event in appended.entry.notification.events:
            yield event, appended
