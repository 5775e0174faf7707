"""The bulk import's writes: rows encoded in worker processes, chained and written by one transaction.

A bulk import (app/bulk_import.py) splits an ingest in two. The CPU-heavy half runs in workers:
`entry_parts` gives each log entry's hashed bytes and its row as COPY text (all but position and
hash); `projections.encode_state`/`encode_transition` and `encode_outbox` give the derived rows.
The parent keeps the one sequential part: `chain` numbers the new entries and links their hashes
in file order, as `log.plan` does for a whole batch, and `write_log`/`write_derived` send what the
workers encoded, each table once, inside the batch's one transaction.

`entry_parts` and `chain` are `log.plan` cut at the hash: tests/test_bulk_import.py pins that
they produce exactly its rows and hashes, so the two cannot drift.
"""

from __future__ import annotations

import hashlib
from binascii import hexlify
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson
import psycopg

from subledger.core.chain import canonical_bytes, chain_slot, entry_for_hash
from subledger.core.events import format_time
from subledger.store import log, projections
from subledger.store import outbox as outbox_sql
from subledger.store.outbox import OutboxRow
from subledger.store.rows import copy_encoded, encoder

_CHAINED = ("position", "hash")
# The log's columns with the two the parent appends (position, hash) moved last.
LOG_COLUMNS = (*(c for c in log.COLUMNS if c not in _CHAINED), *_CHAINED)
_encode_log = encoder(
    [t for c, t in zip(log.COLUMNS, log.TYPES, strict=True) if c not in _CHAINED], end="\t"
)
_encode_outbox = encoder(outbox_sql.TYPES)


# One log entry as a worker prepares it: (source, external_id, chain slot (`chain_slot` of its
# subscription key), the bytes its hash covers after the previous hash of its chain, its row as COPY
# text, UTF-8, up to the position and hash). A plain tuple: it crosses a process boundary, and tuples of
# strings unpickle in C, several times faster than a dataclass or a NamedTuple.
Parts = tuple[str, str, int, bytes, bytes]


def entry_parts(entry: log.Entry, received_at: str | None = None) -> Parts:
    """What `log.plan` computes for `entry` that does not depend on the entries before it.

    `received_at`: `format_time(entry.received_at)` when the caller has it (one per batch)."""
    n = entry.notification
    source, external_id = entry.key
    facts = log.facts_of(n)
    subscription = n.key()
    hashed = canonical_bytes(entry_for_hash(
        source=source,
        external_id=external_id,
        app_id=n.app_id,
        subscription_key=subscription or "",
        received_at=received_at or format_time(entry.received_at),
        historical=entry.historical,
        raw=entry.raw,
        facts=facts,
        arrival=entry.arrival,
    ))
    first = n.events[0] if n.events else None
    row = _encode_log((
        source, external_id, n.app_id, n.kind, subscription,
        next((e.app_user_id for e in n.events if e.app_user_id), None),
        first.environment.value if first else None,
        min((e.occurred_at for e in n.events), default=None),
        entry.received_at, entry.historical, entry.raw, orjson.dumps(facts).decode(), entry.arrival,
    ))
    return (source, external_id, chain_slot(subscription), hashed, row.encode())


def chain(parts: Sequence[Parts], head: log.Head, received_at: datetime
          ) -> tuple[list[int | None], list[bytes], log.LogWrites]:
    """Number and link `parts` onto their chains' heads in order, as `log.plan` does: a repeat
    (already logged, or earlier in `parts`) gets None and a duplicate receipt. Returns each part's
    position, the new rows as COPY text and the heads and receipts to write (`write_log`)."""
    tips = dict(head.tips)
    chains = head.chains
    appended: set[int] = set()
    seen = set(head.seen)
    positions: list[int | None] = []
    lines: list[bytes] = []
    duplicates: list[tuple[str, str, datetime]] = []
    sha256 = hashlib.sha256
    for source, external_id, slot, hashed, row in parts:
        key = (source, external_id)
        if key in seen:
            positions.append(None)
            duplicates.append((source, external_id, received_at))
            continue
        seen.add(key)
        c = slot % chains if chains > 1 else 0
        position, chained = tips[c]
        chained = sha256(chained + hashed).digest()  # core.chain.chain_hash, its bytes given
        position += chains
        tips[c] = (position, chained)
        appended.add(c)
        positions.append(position)
        lines.append(b"%b%d\t\\\\x%b\n" % (row, position, hexlify(chained)))
    return positions, lines, log.LogWrites([], duplicates, {c: tips[c] for c in sorted(appended)})


def write_log(conn: psycopg.Connection, lines: Sequence[bytes], writes: log.LogWrites) -> None:
    """The chained rows by one COPY, then the head and the receipts (by the log's own writer)."""
    if lines:
        copy_encoded(conn, "event_log", LOG_COLUMNS, [b"".join(lines)])
    log.write(conn, writes, copy=True)


def encode_outbox(row: OutboxRow, now: datetime) -> str:
    """An outbox row as a line of COPY text, in `store.outbox.COLUMNS` order."""
    return _encode_outbox(row.values(now))


@dataclass
class Derived:
    """A batch's derived rows as the workers encoded them, in the order a sequential ingest stages them."""

    states: list[bytes]
    transitions: list[bytes]  # COPY text, UTF-8 (workers encode: the writer only joins and sends)
    outbox: list[bytes]
    superseded: list[str]
    revived: list[str]
    again: list[OutboxRow]


def write_derived(conn: psycopg.Connection, derived: Derived, now: datetime) -> None:
    """What `UnitOfWork.commit` writes for a big batch, in its order, from encoded rows."""
    projections.mark_superseded(conn, derived.superseded, now)
    outbox_sql.withdraw(conn, derived.superseded, now)
    projections.revive(conn, derived.revived)
    projections.save_encoded_states(conn, derived.states, now)
    _copy(conn, "transitions", projections.TRANSITION_COLUMNS, derived.transitions)
    _copy(conn, "outbox", outbox_sql.COLUMNS, derived.outbox)
    outbox_sql.insert_missing(conn, derived.again, now)


def _copy(conn: psycopg.Connection, table: str, columns: Sequence[str], lines: Iterable[bytes]) -> None:
    text = b"".join(lines)
    if text:
        copy_encoded(conn, table, columns, [text])
