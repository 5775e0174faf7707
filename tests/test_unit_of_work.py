"""The unit of work's two paths write the same rows: the one-statement CTE (small batches) and COPY.

Each table's writer gives both encodings (store/log.py, store/projections.py, store/outbox.py), so
one could drift from the other unseen: a column forgotten, a JSON value respelt, a conflict rule
changed in one place. Here generated work (log entries and repeats of logged ones, states that
insert or update, transitions, superseded and revived ids, new messages, dead ones, and messages
that may already be queued or delivered) is committed once per path over the same database and
every column of every table is compared, all but the outbox's surrogate id.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subledger.core.events import CanonicalEvent, parse_event
from subledger.core.lifecycle import fold
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.store import log, unit_of_work
from subledger.store.outbox import OutboxRow
from subledger.store.unit_of_work import UnitOfWork

NOW = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)
APP = "com.example"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),)})
TABLES = ("event_log", "log_head", "duplicate_receipts", "subscriptions", "transitions", "outbox",
          "outbox_delivered")
SURROGATE = {("outbox", "id")}

USERS = (None, "u1", 'q"uote', "back\\slash", "ünïcødé ✓", "tab\tnew\nline")
KINDS = ("purchase", "renewal", "auto_renew_disabled", "auto_renew_enabled", "billing_issue", "expiration")
SUBS = ("s1", "s2", "s3")  # s1 and s2 exist before the work; s3 does not
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


def event(eid: str, kind: str, sub: str, minutes_ago: int, user: str | None = "u1", price: str = "9.99"
          ) -> CanonicalEvent:
    data: dict[str, Any] = {"id": eid, "app_id": APP, "type": kind, "subscription_id": sub,
                            "occurred_at": (NOW - timedelta(minutes=minutes_ago)).isoformat()}
    if user is not None:
        data["app_user_id"] = user
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price=price, currency="USD")
    return parse_event(data)


@pytest.fixture
def seeded(conn: psycopg.Connection) -> dict[str, list[str]]:
    """A ledger the work lands on: two subscriptions, live and superseded transitions, queued,
    leased and delivered messages."""
    seed = [event("seed-1", "purchase", "s1", 600), event("seed-2", "renewal", "s1", 500),
            event("seed-3", "auto_renew_disabled", "s1", 400), event("seed-4", "purchase", "s2", 300)]
    ingest(conn, [Incoming(Notification.of(e), b"seed") for e in seed], POLICY, NOW - timedelta(hours=1))
    ids = [r[0] for r in conn.execute("SELECT id FROM transitions ORDER BY log_position")]
    messages = [r[0] for r in conn.execute("SELECT message_id FROM outbox ORDER BY id")]
    conn.execute("UPDATE transitions SET superseded_at = %s WHERE id = %s", (NOW - timedelta(hours=1), ids[-1]))
    conn.execute("UPDATE outbox SET lease_until = %s, lease_owner = 'relay' WHERE message_id = %s",
                 (NOW + timedelta(minutes=5), messages[1]))
    conn.execute(
        "INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber, body, attempts,"
        " created_at, delivered_at) SELECT message_id, transition_id, destination, app_id, subscriber, body, 1,"
        " created_at, %s FROM outbox WHERE message_id = %s", (NOW, messages[0]))
    conn.execute("DELETE FROM outbox WHERE message_id = %s", (messages[0],))
    conn.commit()
    return {"live": ids[:-1], "superseded": ids[-1:], "messages": messages}


_EVENTS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.sampled_from(SUBS), st.integers(1, 2000), st.sampled_from(USERS),
              st.sampled_from(("9.99", "0", "123456789012.3456", "1e2"))),
    max_size=8,
)
_WORK = st.fixed_dictionaries({
    "events": _EVENTS,
    "raw": st.binary(max_size=40),
    "historical": st.booleans(),
    "repeats": st.lists(st.sampled_from(("seed-1", "seed-4", "g-0")), max_size=3),
    "positions": st.integers(-5, 5),
    "supersede": st.integers(0, 3),
    "revive": st.booleans(),
    "bodies": st.lists(JSON, min_size=1, max_size=3),
    "dead": st.sampled_from((None, "no rate for EUR; fix the rates table")),
    "delay": st.integers(0, 3600),
    "again": st.lists(st.integers(0, 3), max_size=4),
})


def build(conn: psycopg.Connection, spec: dict[str, Any], seeded: dict[str, list[str]]) -> UnitOfWork:
    """The work `spec` describes, staged as ingest and replay stage it (nothing written yet)."""
    events = [event(f"g-{n}", kind, sub, minutes, user, price)
              for n, (kind, sub, minutes, user, price) in enumerate(spec["events"])]
    repeats = [event(eid, "purchase", "s1", 600) for eid in spec["repeats"]]
    entries = [log.Entry(Notification.of(e), spec["raw"] + e.id.encode(), NOW, spec["historical"])
               for e in events + repeats]
    keys = sorted({e.subscription_key for e in events})
    begun = unit_of_work.begin(conn, entries, keys, [])
    _, writes = log.plan(entries, begun.head)
    work = UnitOfWork(NOW)
    work.log = writes  # staged, not appended: the path is the commit's choice here
    by_key: defaultdict[str, list[CanonicalEvent]] = defaultdict(list)
    for e in events:
        by_key[e.subscription_key].append(e)
    position = begun.head.position
    for group in by_key.values():
        folded = fold(group)
        position += len(group)
        work.stage_state(folded.state, max(1, position + spec["positions"]))
        for t in folded.transitions:
            work.transitions.append((t, position, spec["historical"]))
            for n, body in enumerate(spec["bodies"]):
                work.outbox.append(OutboxRow(f"{t.id}-{n}", t.id, f"dest{n}", t.app_id, t.subscriber,
                                             [{"messageId": f"{t.id}-{n}", "properties": body}],
                                             NOW + timedelta(seconds=spec["delay"]),
                                             spec["dead"] if n == 0 else None))
    work.superseded.extend(seeded["live"][: spec["supersede"]])
    if spec["revive"]:
        work.revived.extend(seeded["superseded"])
    known = seeded["messages"]
    for n in spec["again"]:
        mid = known[n] if n < len(known) else "fresh-message"
        work.outbox_if_missing.append(OutboxRow(mid, seeded["live"][0], "segment", APP, "u1",
                                                [{"messageId": mid, "again": n}], NOW, None))
    return work


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table the work may touch, all columns but surrogate ids, in a stable order."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in TABLES:
        columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
            (table,)) if (table, r[0]) not in SURROGATE]
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
        out[table] = sorted((tuple(zip(columns, row, strict=True)) for row in rows), key=repr)
    return out


def committed(conn: psycopg.Connection, spec: dict[str, Any], seeded: dict[str, list[str]], *, copy: bool
              ) -> dict[str, list[tuple[Any, ...]]]:
    with conn.transaction(force_rollback=True):
        work = build(conn, spec, seeded)
        assert work.small  # the generated batches are small: forcing COPY is the change under test
        work.commit(conn, copy=copy)
        return snapshot(conn)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_WORK)
def test_cte_and_copy_write_identical_rows(
    conn: psycopg.Connection, seeded: dict[str, list[str]], spec: dict[str, Any]
) -> None:
    before = snapshot(conn)
    through_cte = committed(conn, spec, seeded, copy=False)
    through_copy = committed(conn, spec, seeded, copy=True)
    assert through_cte == through_copy
    if spec["events"] or spec["repeats"]:
        assert through_cte != before  # the work really wrote something on both paths


def test_the_path_is_chosen_by_size(conn: psycopg.Connection) -> None:
    """Up to SMALL_BATCH entries: one statement at commit; more: the log is COPYed as soon as it is
    staged, so later statements of the transaction see it."""
    for size, small in ((unit_of_work.SMALL_BATCH, True), (unit_of_work.SMALL_BATCH + 1, False)):
        entries = [log.Entry(Notification.of(event(f"p-{size}-{n}", "purchase", f"p{n}", 10)), b"{}", NOW, False)
                   for n in range(size)]
        with conn.transaction(force_rollback=True):
            begun = unit_of_work.begin(conn, entries, [], [])
            work = UnitOfWork(NOW)
            work.append(conn, log.plan(entries, begun.head)[1])
            assert work.small is small
            written = conn.execute("SELECT count(*) FROM event_log").fetchone()
            assert written == ((0,) if small else (size,))
            work.commit(conn)
            assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (size,)
