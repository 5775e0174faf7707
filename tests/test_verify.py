"""Verify: an intact ledger passes; an edited entry, hash or projection is named and exits non-zero."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from subledger.app.cli import app as cli
from subledger.core.events import parse_event
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.store.verify import verify

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
APP = "com.example"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),)})


def item(eid: str, kind: str, hours_ago: float, sub: str, **extra: Any) -> Incoming:
    data: dict[str, Any] = {
        "id": eid, "app_id": APP, "type": kind, "subscription_id": sub, "app_user_id": f"user-{sub}",
        "occurred_at": (NOW - timedelta(hours=hours_ago)).isoformat(), "attributes": {"ratio": 0.1, "n": 3},
    }
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price="9.99", currency="USD")
    data.update(extra)
    return Incoming(Notification.of(parse_event(data)), json.dumps(data).encode())


@pytest.fixture
def ledger(conn: psycopg.Connection) -> psycopg.Connection:
    for n in range(4):
        sub = f"s{n}"
        ingest(conn, [item(f"{sub}-1", "purchase", 50, sub, period_type="trial")], POLICY, NOW)
        ingest(conn, [item(f"{sub}-2", "renewal", 40, sub), item(f"{sub}-3", "auto_renew_disabled", 30, sub)],
               POLICY, NOW)
    ingest(conn, [item("s0-0", "billing_issue", 45, "s0")], POLICY, NOW)  # late: a re-fold
    ingest(conn, [item("s0-1", "purchase", 50, "s0", period_type="trial")], POLICY, NOW)  # duplicate
    return conn


def tamper(conn: psycopg.Connection, sql: str, *params: Any) -> None:
    """What only the owner can do: switch the append-only trigger off, edit, switch it back on."""
    conn.execute("ALTER TABLE event_log DISABLE TRIGGER event_log_append_only")
    conn.execute(sql, params)
    conn.execute("ALTER TABLE event_log ENABLE TRIGGER event_log_append_only")
    conn.commit()


def run(db_url: str, *args: str) -> Any:
    return CliRunner().invoke(cli, ["verify", *args, "--database-url", db_url])


def test_intact_ledger_verifies(ledger: psycopg.Connection, db_url: str) -> None:
    result = verify(ledger)
    assert result.ok, result.problems
    assert (result.entries, result.subscriptions) == (13, 4)
    cli_result = run(db_url)
    assert cli_result.exit_code == 0, cli_result.output
    assert "ok: 13 log entries" in cli_result.stdout


def test_edited_entry_is_named_by_position(ledger: psycopg.Connection, db_url: str) -> None:
    position = 6
    tamper(ledger, "UPDATE event_log SET facts = jsonb_set(facts, '{events,0,price}', '\"0.99\"')"
                   " WHERE position = %s", position)
    result = verify(ledger)
    assert not result.ok and result.first_bad_position == position
    chain = [p for p in result.problems if p.kind == "chain"]
    assert [p.position for p in chain] == [position]  # only that entry: the rest still chain
    cli_result = run(db_url)
    assert cli_result.exit_code == 1
    assert f"broken at position {position}" in cli_result.stderr
    body = json.loads(run(db_url, "--json").stdout)
    assert body["ok"] is False and body["first_bad_position"] == position


@pytest.mark.parametrize(
    ("sql", "position"),
    [
        ("UPDATE event_log SET raw = raw || '\\x20'::bytea WHERE position = 3", 3),
        ("UPDATE event_log SET received_at = received_at + interval '1 second' WHERE position = 9", 9),
        ("UPDATE event_log SET hash = decode(repeat('ab', 32), 'hex') WHERE position = 2", 2),
        ("DELETE FROM event_log WHERE position = 5", 5),
    ],
)
@pytest.mark.edits_tables  # the log's rollup then counts the deleted entry
def test_other_edits_are_named(ledger: psycopg.Connection, sql: str, position: int) -> None:
    tamper(ledger, sql)
    result = verify(ledger)
    assert not result.ok and result.first_bad_position == position


@pytest.mark.edits_tables
def test_a_rollup_that_disagrees_with_its_table_is_named(ledger: psycopg.Connection) -> None:
    """The overview's counts are recounted: a rollup edited (or a trigger switched off) is named by
    table and group, with both counts; the log and the projections are still fine."""
    assert verify(ledger).ok
    entries = ledger.execute("SELECT count(*) FROM event_log").fetchone()
    ledger.execute("UPDATE rollup_log_days SET entries = entries + 1"
                   " WHERE ctid = (SELECT min(ctid) FROM rollup_log_days)")
    ledger.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_rollup_delete")
    ledger.execute("DELETE FROM outbox WHERE id = (SELECT min(id) FROM outbox)")
    ledger.execute("ALTER TABLE outbox ENABLE TRIGGER outbox_rollup_delete")
    ledger.commit()
    result = verify(ledger)
    assert not result.ok and result.first_bad_position is None
    described = sorted(p.describe() for p in result.problems)
    assert [p.kind for p in result.problems] == ["rollup", "rollup"], described
    assert entries is not None
    assert described[0].startswith(f"rollup: rollup_log_days {NOW:%Y-%m-%d}/custom/") and \
        described[0].endswith(f": kept {entries[0] + 1}, the table holds {entries[0]}"), described
    assert described[1].startswith("rollup: rollup_outbox ") and "/pending: kept" in described[1], described


def test_projection_that_disagrees_with_the_fold_is_named(ledger: psycopg.Connection, db_url: str) -> None:
    key = f"{APP}/other/s2"
    ledger.execute("UPDATE subscriptions SET state = jsonb_set(state, '{auto_renew}', 'true') WHERE key = %s", (key,))
    ledger.execute("DELETE FROM transitions WHERE subscription_key = %s AND kind = 'trial_started'",
                   (f"{APP}/other/s3",))
    ledger.commit()
    result = verify(ledger)
    assert not result.ok and result.first_bad_position is None
    described = [p.describe() for p in result.problems]
    assert any(key in d and "auto_renew" in d for d in described)
    assert any("s3" in d and "transitions missing" in d for d in described)
    cli_result = run(db_url)
    assert cli_result.exit_code == 1 and "auto_renew" in cli_result.stderr
    # replay repairs what verify found
    from subledger.outbox.replay import replay

    replay(ledger, POLICY, NOW)
    assert verify(ledger).ok
