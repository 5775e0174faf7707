"""The append-only log: the database itself refuses change, and the chain links every entry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from subledger.core.chain import GENESIS, chain_hash, entry_for_hash
from subledger.core.events import format_time, parse_event
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)  # injected into ingest; facts are dated from it
RECENT = (NOW - timedelta(hours=2)).isoformat()


def _event(i: int, **extra: object) -> Incoming:
    data = {
        "id": f"e{i}", "app_id": "app", "type": "purchase", "occurred_at": RECENT,
        "subscription_id": f"s{i}", "product_id": "p", **extra,
    }
    return Incoming(Notification.of(parse_event(data)), repr(data).encode())


@pytest.fixture
def filled(conn: psycopg.Connection) -> psycopg.Connection:
    ingest(conn, [_event(i) for i in range(3)], IngestPolicy(), NOW)
    return conn


@pytest.mark.parametrize(
    "statement",
    ["UPDATE event_log SET app_id = 'x'", "DELETE FROM event_log", "TRUNCATE event_log"],
    ids=["update", "delete", "truncate"],
)
def test_owner_is_refused_by_triggers(filled: psycopg.Connection, statement: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        filled.execute(statement)
    filled.rollback()
    assert filled.execute("SELECT count(*) FROM event_log").fetchone() == (3,)


@pytest.mark.parametrize(
    "statement",
    ["UPDATE event_log SET app_id = 'x'", "DELETE FROM event_log", "TRUNCATE event_log"],
    ids=["update", "delete", "truncate"],
)
def test_app_role_has_no_privilege(filled: psycopg.Connection, statement: str) -> None:
    filled.execute("SET ROLE subledger_app")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        filled.execute(statement)
    filled.rollback()


def test_app_role_can_ingest(conn: psycopg.Connection) -> None:
    conn.execute("SET ROLE subledger_app")
    conn.commit()
    outcomes = ingest(conn, [_event(1)], IngestPolicy(), NOW)
    assert [o.result for o in outcomes] == ["new"]


def test_hash_chain_links_every_entry(filled: psycopg.Connection) -> None:
    rows = filled.execute(
        "SELECT position, source, external_id, app_id, subscription_key, received_at, historical, raw, facts,"
        " hash FROM event_log ORDER BY position"
    ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]  # gapless
    previous = GENESIS
    for position, source, ext, app, key, received, historical, raw, facts, stored in rows:
        expected = chain_hash(
            previous,
            entry_for_hash(
                source=source, external_id=ext, app_id=app, subscription_key=key or "",
                received_at=format_time(received), historical=historical, raw=bytes(raw), facts=facts,
            ),
        )
        assert bytes(stored) == expected, f"entry {position} does not chain"
        previous = expected
    head = filled.execute("SELECT position, hash FROM log_head").fetchone()
    assert head is not None and head[0] == 3 and bytes(head[1]) == previous


def test_raw_payload_is_kept_verbatim(conn: psycopg.Connection) -> None:
    raw = b'{"id": "v1",  "weird spacing": true}'
    event = parse_event(
        {"id": "v1", "app_id": "a", "type": "purchase", "occurred_at": RECENT,
         "subscription_id": "s", "product_id": "p"}
    )
    ingest(conn, [Incoming(Notification.of(event), raw)], IngestPolicy(), NOW)
    stored = conn.execute("SELECT raw FROM event_log").fetchone()
    assert stored is not None and bytes(stored[0]) == raw
