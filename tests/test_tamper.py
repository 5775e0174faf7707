"""Tamper evidence: every column of `event_log` is hashed, chained or re-derived and compared by verify.

The column list comes from the table itself (information_schema), so a column added later that
verify neither hashes nor re-derives makes `test_every_column_is_tamper_evident` fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg.sql
import pytest
from typer.testing import CliRunner

from subledger.app.cli import app as cli
from subledger.core.chain import COVERAGE, derived_columns
from subledger.core.events import Source, parse_event
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import SMALL_BATCH, Incoming, IngestPolicy, ingest
from subledger.store.audit import resolve
from subledger.store.verify import verify

APP = "com.example"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),)})

# How an owner with the trigger off changes a value of each column type (a NULL becomes a value).
TAMPER = {
    "text": "coalesce({c}, '') || '~'",
    "timestamp with time zone": "coalesce({c}, received_at) + interval '1 microsecond'",
    "boolean": "NOT {c}",
    "bytea": "{c} || '\\x00'::bytea",
    "jsonb": "{c} || '{{\"tampered\": true}}'::jsonb",
    "bigint": "{c} + 1000000",
}


def _now() -> datetime:
    return datetime.now(UTC)


def _item(eid: str, sub: str, when: datetime, **extra: Any) -> Incoming:
    data: dict[str, Any] = {
        "id": eid, "app_id": APP, "type": "purchase", "subscription_id": sub, "app_user_id": f"user-{sub}",
        "occurred_at": when.isoformat(), "product_id": "monthly", "price": "9.99", "currency": "USD",
        "environment": "sandbox", "expires_at": (when + timedelta(days=30)).isoformat(), **extra,
    }
    return Incoming(Notification.of(parse_event(data)), json.dumps(data).encode())


def _stored_only(external_id: str, key: str | None) -> Incoming:
    """A delivery with no facts (informational), logged as is: its derived columns are NULL."""
    notification = Notification(source=Source.STRIPE, external_id=external_id, app_id=APP, kind="customer.updated",
                                subscription_key=key)
    return Incoming(notification, b'{"type": "customer.updated"}')


@pytest.fixture
def ledger(conn: psycopg.Connection) -> psycopg.Connection:
    now = _now()
    ingest(conn, [_item("a-1", "s1", now - timedelta(hours=3))], POLICY, now)                # position 1
    ingest(conn, [_item("b-1", "s2", now - timedelta(hours=2), period_type="trial")], POLICY, now)  # 2
    ingest(conn, [_stored_only("evt_info", None)], POLICY, now)                                # 3
    ingest(conn, [_item("a-2", "s1", now - timedelta(hours=1), type="renewal")], POLICY, now)  # 4
    assert verify(conn).ok
    return conn


def _columns(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return [
        (str(name), str(kind)) for name, kind in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'event_log' ORDER BY ordinal_position"
        ).fetchall()
    ]


def _set(conn: psycopg.Connection, sql: psycopg.sql.SQL | psycopg.sql.Composed, params: tuple[Any, ...]) -> Any:
    """What only the owner can do: switch the user triggers off, edit, switch them back on."""
    conn.execute("ALTER TABLE event_log DISABLE TRIGGER USER")
    row = conn.execute(sql, params).fetchone()
    conn.execute("ALTER TABLE event_log ENABLE TRIGGER USER")
    conn.commit()
    return None if row is None else row[0]


@pytest.fixture
def pristine(ledger: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """A copy of the log to put each edited value back from, so one ledger serves every column."""
    ledger.execute("CREATE TABLE pristine AS SELECT * FROM event_log")
    ledger.commit()
    yield ledger


def _edit_and_restore(conn: psycopg.Connection, column: str, kind: str, position: int, check: Any) -> str | None:
    """Edit one column of one entry, run `check`, put the value back; the reason it failed, if it did."""
    expression = TAMPER.get(kind)
    if expression is None:
        return f"{column}: no tamper for type {kind} (add one to TAMPER)"
    c = psycopg.sql.Identifier(column)
    edit = psycopg.sql.SQL("UPDATE event_log SET {c} = " + expression + " WHERE position = %s RETURNING ctid")
    ctid = _set(conn, edit.format(c=c), (position,))
    try:
        return check(column)
    finally:
        restore = psycopg.sql.SQL("UPDATE event_log e SET {c} = p.{c} FROM pristine p "
                                  "WHERE e.ctid = %s::tid AND p.position = %s RETURNING 1")
        assert _set(conn, restore.format(c=c), (ctid, position)) == 1
        assert verify(conn).ok, f"restoring {column} left the log broken"


@pytest.mark.parametrize("position", [2, 3], ids=["entry-with-facts", "stored-only-entry"])
def test_every_column_is_tamper_evident(pristine: psycopg.Connection, position: int) -> None:
    def check(column: str) -> str | None:
        result = verify(pristine)
        if result.ok:
            return f"{column}: verify passed"
        if result.first_bad_position != position:
            return f"{column}: first bad position {result.first_bad_position}, not {position}"
        named = [p for p in result.problems if p.position == position]
        if COVERAGE.get(column) == "derived" and not any(p.column == column for p in named):
            return f"{column}: not named in {[p.describe() for p in named]}"
        return None

    columns = _columns(pristine)
    assert {"app_user_id", "kind", "environment", "occurred_at"} <= {c for c, _ in columns}
    failures = [f for column, kind in columns if (f := _edit_and_restore(pristine, column, kind, position, check))]
    assert not failures, "columns verify does not cover:\n" + "\n".join(failures)


def test_cli_names_the_position_and_column_of_each_edit(pristine: psycopg.Connection, db_url: str) -> None:
    position = 4
    runner = CliRunner()

    def check(column: str) -> str | None:
        plain = runner.invoke(cli, ["verify", "--database-url", db_url])
        body = json.loads(runner.invoke(cli, ["verify", "--json", "--database-url", db_url]).stdout)
        if plain.exit_code != 1:
            return f"{column}: exit {plain.exit_code}"
        if f"broken at position {position}" not in plain.stderr:
            return f"{column}: position not named in {plain.stderr!r}"
        if body["ok"] is not False or body["first_bad_position"] != position:
            return f"{column}: --json says {body['ok']}, {body['first_bad_position']}"
        if COVERAGE.get(column) == "derived" and (
            f"column {column}" not in plain.stderr or column not in {p["column"] for p in body["problems"]}
        ):
            return f"{column}: column not named in {plain.stderr!r}"
        return None

    failures = [f for column, kind in _columns(pristine) if (f := _edit_and_restore(pristine, column, kind, position,
                                                                                    check))]
    assert not failures, "\n".join(failures)


def test_every_column_is_classified(conn: psycopg.Connection) -> None:
    """The documentation of what covers each column (core.chain.COVERAGE) lists the table's columns."""
    assert sorted(c for c, _ in _columns(conn)) == sorted(COVERAGE)


def test_mallory_edit_of_app_user_id_is_caught(ledger: psycopg.Connection, db_url: str) -> None:
    """The issue's case: the subscription of user-s2 shows up under mallory; verify says so."""
    _set(ledger, psycopg.sql.SQL("UPDATE event_log SET app_user_id = 'mallory' WHERE position = 2 RETURNING 1"), ())
    assert resolve(ledger, "mallory") == [f"{APP}/other/s2"]  # what a reader is misled into
    ledger.commit()
    result = verify(ledger)
    assert not result.ok and result.first_bad_position == 2
    [problem] = [p for p in result.problems if p.position == 2]
    assert problem.column == "app_user_id" and "'mallory'" in problem.detail and "'user-s2'" in problem.detail
    cli_result = CliRunner().invoke(cli, ["verify", "--database-url", db_url])
    assert cli_result.exit_code == 1
    assert "broken at position 2" in cli_result.stderr and "column app_user_id is 'mallory'" in cli_result.stderr


def test_null_subscription_key_made_empty_is_caught(ledger: psycopg.Connection) -> None:
    """The hash covers `subscription_key or ''`, so NULL → '' is the one edit only the NULL rule catches."""
    _set(ledger, psycopg.sql.SQL("UPDATE event_log SET subscription_key = '' WHERE position = 3 RETURNING 1"), ())
    result = verify(ledger)
    assert not result.ok and result.first_bad_position == 3
    assert [p.column for p in result.problems if p.position == 3] == ["subscription_key"]


@pytest.mark.parametrize("size", [1, SMALL_BATCH + 1], ids=["one-statement-write", "copy-write"])
def test_writer_and_verify_derive_the_same_columns(conn: psycopg.Connection, size: int) -> None:
    """A notification of several facts: the user of a later fact, the first fact's environment, the
    earliest occurrence. Both write paths store what verify re-derives."""
    now = _now()
    late, early = now - timedelta(hours=1), now - timedelta(hours=5, microseconds=7)
    first = parse_event({"id": "m-1", "app_id": APP, "type": "renewal", "subscription_id": "m",
                         "environment": "sandbox", "occurred_at": late.isoformat(), "product_id": "monthly"})
    second = parse_event({"id": "m-2", "app_id": APP, "type": "auto_renew_disabled", "subscription_id": "m",
                          "app_user_id": "user-m", "occurred_at": early.isoformat()})
    multi = Notification(source=Source.STRIPE, external_id="evt_multi", app_id=APP,
                         kind="customer.subscription.updated", events=(first, second),
                         subscription_key=first.subscription_key)
    items = [Incoming(multi, b"{}")] + [_item(f"f-{n}", f"f{n}", now - timedelta(minutes=n)) for n in range(size - 1)]
    ingest(conn, items, POLICY, now)
    row = conn.execute("SELECT kind, app_user_id, environment, occurred_at, facts FROM event_log "
                       "WHERE external_id = 'evt_multi'").fetchone()
    assert row is not None
    assert row[:4] == ("customer.subscription.updated", "user-m", "sandbox", early)
    assert derived_columns(row[4]) == row[:4]
    result = verify(conn)
    assert result.ok, result.problems


def test_projection_columns_readers_filter_on_are_compared(ledger: psycopg.Connection) -> None:
    """The scheduler finds due periods by `subscriptions.expires_at`; audit resolves users by `app_user_id`."""
    key = f"{APP}/other/s1"
    ledger.execute("UPDATE subscriptions SET expires_at = expires_at + interval '30 days' WHERE key = %s", (key,))
    ledger.execute("UPDATE subscriptions SET app_id = 'elsewhere' WHERE key = %s", (f"{APP}/other/s2",))
    ledger.commit()
    result = verify(ledger)
    assert not result.ok and result.first_bad_position is None
    assert {(p.subscription, p.column) for p in result.problems} == {
        (key, "expires_at"), (f"{APP}/other/s2", "app_id")}


def _transition(conn: psycopg.Connection, sub: str) -> tuple[str, int]:
    row = conn.execute("SELECT id, log_position FROM transitions WHERE subscription_key = %s ORDER BY log_position "
                       "LIMIT 1", (f"{APP}/other/{sub}",)).fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


@pytest.mark.parametrize(
    ("edit", "column"),
    [
        ("subscriber = 'mallory'", "subscriber"),
        ("subscriber = 'mallory', body = jsonb_set(body, '{app_user_id}', '\"mallory\"')", "subscriber"),
        ("subscriber = 'user-s2', body = jsonb_set(body, '{app_user_id}', '\"user-s2\"')", "subscriber"),
        ("kind = 'renewal'", "kind"),
        ("kind = 'renewal', body = jsonb_set(body, '{kind}', '\"renewal\"')", "kind"),
        ("log_position = 2", "log_position"),
        ("historical = NOT historical", "historical"),
        ("occurred_at = occurred_at - interval '1 day'", "occurred_at"),
        ("app_id = 'elsewhere'", "app_id"),
        ("body = jsonb_set(body, '{event_id}', '\"a-2\"')", "id"),
    ],
)
def test_transition_columns_readers_use_are_checked(ledger: psycopg.Connection, edit: str, column: str) -> None:
    """Transitions have no trigger (the app role may update them): the audit resolves a subscriber
    by `transitions.subscriber` and follows `log_position` to the causing entry."""
    tid, _ = _transition(ledger, "s1")
    ledger.execute(f"UPDATE transitions SET {edit} WHERE id = %s", (tid,))  # type: ignore[arg-type]
    ledger.commit()
    result = verify(ledger)
    assert not result.ok
    named = [p for p in result.problems if p.kind == "transition"]
    assert [(p.subscription, p.column) for p in named] == [(f"{APP}/other/s1", column)], result.problems
    assert tid in named[0].detail


def test_numbers_jsonb_respells_still_verify(conn: psycopg.Connection) -> None:
    """jsonb gives a float of 1e16 or more back without its exponent, and has no -0.0: the append
    hashed the float's spelling, so verify tries it before calling the entry changed."""
    now = _now()
    weird: list[Any] = [1e16, 1.2345678901234568e17, -0.0, [0.0, 3e17], 2.5e-10]
    ingest(conn, [_item(f"n-{i}", f"n{i}", now - timedelta(hours=1), attributes={"x": v})
                  for i, v in enumerate(weird)], POLICY, now)
    assert conn.execute("SELECT facts->'events'->0->'attributes'->>'x' FROM event_log WHERE position = 1"
                        ).fetchone() == ("10000000000000000",)
    result = verify(conn)
    assert result.ok, result.problems
    # a respelling never excuses a changed value
    _set(conn, psycopg.sql.SQL("UPDATE event_log SET facts = jsonb_set(facts, '{events,0,attributes,x}', "
                               "'10000000000000001') WHERE position = 1 RETURNING 1"), ())
    assert verify(conn).first_bad_position == 1
