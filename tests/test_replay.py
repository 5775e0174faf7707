"""Replay: a rebuild from the log restores what was lost and never creates a second messageId."""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from subledger.core.events import parse_event
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.outbox.replay import replay

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench's event generator
from bench.generate import APP, events

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP, publish_historical=True),)})


def incoming(data: dict[str, Any]) -> Incoming:
    return Incoming(Notification.of(parse_event(data)), json.dumps(data).encode())


def load(conn: psycopg.Connection, count: int) -> None:
    batch: list[Incoming] = []
    for data in events(count):
        batch.append(incoming(data))
        if len(batch) == 1000:
            ingest(conn, batch, POLICY, NOW, notify=False)
            batch.clear()
    if batch:
        ingest(conn, batch, POLICY, NOW, notify=False)


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    """Everything a replay may touch, in a comparable form."""
    def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(sql).fetchall()]

    return {
        "states": rows("SELECT key, app_user_id, status, expires_at, state, last_position FROM subscriptions"
                       " ORDER BY key"),
        "transitions": rows("SELECT id, kind, subscription_key, log_position, historical, superseded_at IS NULL,"
                            " body FROM transitions ORDER BY id"),
        "messages": rows("SELECT message_id, transition_id, body FROM outbox UNION ALL"
                         " SELECT message_id, transition_id, body FROM outbox_delivered ORDER BY 1"),
    }


def test_unchanged_log_of_10000_events_creates_no_message(conn: psycopg.Connection) -> None:
    load(conn, 10_000)
    before = snapshot(conn)
    assert len(before["messages"]) > 9_000
    seen: list[int] = []
    report = replay(conn, POLICY, NOW + timedelta(days=1), batch=300, progress=seen.append)
    assert report.subscriptions == len(before["states"]) == sum(seen)
    assert (report.states, report.transitions, report.superseded, report.revived, report.messages) == (0, 0, 0, 0, 0)
    assert snapshot(conn) == before
    from subledger.store.verify import verify

    checked = verify(conn)
    assert checked.ok and checked.entries == 10_000, checked.problems[:3]


def test_replay_rebuilds_lost_projections_transitions_and_messages(conn: psycopg.Connection) -> None:
    load(conn, 200)
    before = snapshot(conn)
    key = before["states"][0][0]
    other = before["states"][1][0]
    delivered = conn.execute(
        "SELECT o.message_id FROM outbox o JOIN transitions t ON t.id = o.transition_id"
        " WHERE t.subscription_key = %s ORDER BY o.id LIMIT 1", (key,),
    ).fetchone()
    assert delivered is not None
    conn.execute(  # as the relay does on a 2xx
        "WITH gone AS (DELETE FROM outbox WHERE message_id = %s RETURNING *)"
        " INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber, body,"
        " attempts, created_at, delivered_at, status_code)"
        " SELECT message_id, transition_id, destination, app_id, subscriber, body, 1, created_at, %s, 200 FROM gone",
        (delivered[0], NOW),
    )
    conn.commit()
    expected = snapshot(conn)
    # lose every derived row of two subscriptions (the log keeps the facts)
    for k in (key, other):
        conn.execute("DELETE FROM outbox WHERE transition_id IN"
                     " (SELECT id FROM transitions WHERE subscription_key = %s)", (k,))
        conn.execute("DELETE FROM transitions WHERE subscription_key = %s", (k,))
        conn.execute("DELETE FROM subscriptions WHERE key = %s", (k,))
    conn.execute("UPDATE subscriptions SET state = jsonb_set(state, '{renewal_number}', '999')"
                 " WHERE key = (SELECT max(key) FROM subscriptions)")
    conn.commit()

    dry = replay(conn, POLICY, NOW, dry_run=True)
    assert dry.dry_run and dry.states == 3 and dry.transitions > 0
    lines = [line for c in dry.changes for line in c.lines()]
    assert any(line.startswith(f"{key}: projection missing") for line in lines)
    assert any(line.endswith("projection differs") for line in lines)
    assert delivered[0] not in " ".join(lines)  # delivered: never enqueued again
    assert conn.execute("SELECT count(*) FROM subscriptions").fetchone() == (len(before["states"]) - 2,)

    one = replay(conn, POLICY, NOW, subscription=key)
    assert one.subscriptions == 1 and one.states == 1
    full = replay(conn, POLICY, NOW)
    assert full.states == 2 and full.messages == dry.messages - one.messages
    after = snapshot(conn)
    assert after["states"] == expected["states"]
    assert after["transitions"] == expected["transitions"]
    assert after["messages"] == expected["messages"]
    again = replay(conn, POLICY, NOW)
    assert (again.states, again.transitions, again.messages) == (0, 0, 0)


def test_replay_waits_for_the_log_head_lock(conn: psycopg.Connection, db_url: str) -> None:
    load(conn, 20)
    holder = psycopg.connect(db_url)
    holder.execute("SELECT position FROM log_head FOR UPDATE")  # an ingest in progress
    done = threading.Event()

    def run() -> None:
        with psycopg.connect(db_url) as c:
            replay(c, POLICY, NOW)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    assert not done.is_set()
    holder.rollback()
    thread.join(timeout=30)
    assert done.is_set()
    holder.close()


def test_cli_replay_dry_run_and_json(conn: psycopg.Connection, db_url: str, tmp_path: Path) -> None:
    from subledger.app.cli import app as cli

    load(conn, 30)
    conn.execute("DELETE FROM subscriptions WHERE key = (SELECT min(key) FROM subscriptions)")
    conn.commit()
    config = tmp_path / "c.toml"
    config.write_text(f'[apps."{APP}".destinations.segment]\nwrite_key = "k"\npublish_historical = true\n')
    runner = CliRunner()
    base = ["--config", str(config), "--database-url", db_url]
    dry = runner.invoke(cli, ["replay", "--dry-run", *base])
    assert dry.exit_code == 0, dry.output
    assert "would change: 1 projection," in dry.stdout and "projection missing" in dry.stdout
    done = runner.invoke(cli, ["replay", "--json", *base])
    assert json.loads(done.stdout)["states"] == 1
    again = runner.invoke(cli, ["replay", "--json", *base])
    assert json.loads(again.stdout)["states"] == 0 and json.loads(again.stdout)["messages"] == 0
    missing = runner.invoke(cli, ["replay", "--subscription", "no/such/key", *base])
    assert missing.exit_code == 1


@pytest.mark.parametrize("destinations", [(), ("segment", "rudder")])
def test_replay_after_adding_a_destination_enqueues_only_for_it(conn: psycopg.Connection,
                                                                destinations: tuple[str, ...]) -> None:
    load(conn, 50)
    before = {r[0] for r in conn.execute("SELECT message_id FROM outbox")}
    policy = IngestPolicy(destinations={
        APP: tuple(Destination(name=d, app_id=APP, publish_historical=True) for d in destinations)})
    report = replay(conn, policy, NOW)
    after = {r[0]: r[1] for r in conn.execute("SELECT message_id, destination FROM outbox")}
    assert before <= set(after)
    assert {after[m] for m in set(after) - before} <= {"rudder"}
    assert report.messages == len(set(after) - before)
