"""Retention: old delivery detail is pruned in small batches, the log never, and nothing is sent twice.

Every time is relative to an injected `now` (the real clock's, as the receipts function floors its
cutoff at the database's `now() - 1 day`), never to a calendar date.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.cli import app as cli
from subledger.app.http import create_app
from subledger.app.worker import build_relay, build_scheduler
from subledger.core.errors import ConfigError
from subledger.core.events import parse_event
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.outbox.relay import Relay
from subledger.outbox.replay import replay
from subledger.scheduler.service import Scheduler, SchedulerConfig
from subledger.store import audit, retention
from subledger.store.retention import Retention, prune
from subledger.store.verify import verify

APP = "com.example"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),)})
CONFIGURED = {(APP, "segment")}
SUBS = 6  # subscriptions; each a purchase then a renewal: two messages


def now_utc() -> datetime:
    return datetime.now(UTC)


def item(eid: str, kind: str, at: datetime, sub: str) -> Incoming:
    data: dict[str, Any] = {
        "id": eid, "app_id": APP, "type": kind, "subscription_id": sub, "app_user_id": f"user-{sub}",
        "occurred_at": at.isoformat(), "product_id": "monthly", "price": "9.99", "currency": "USD",
    }
    return Incoming(Notification.of(parse_event(data)), json.dumps(data).encode())


def load(conn: psycopg.Connection, now: datetime, subs: range = range(SUBS)) -> None:
    """Ingested at `now`: every message lands in the outbox."""
    batch = []
    for n in subs:
        batch += [item(f"p{n}", "purchase", now - timedelta(hours=3), f"s{n}"),
                  item(f"r{n}", "renewal", now - timedelta(hours=2), f"s{n}")]
    ingest(conn, batch, POLICY, now, notify=False)


def message_ids(conn: psycopg.Connection, sub: str | None = None) -> list[str]:
    rows = conn.execute(
        "SELECT o.message_id FROM outbox o JOIN transitions t ON t.id = o.transition_id"
        " WHERE %(sub)s::text IS NULL OR t.subscription_key = %(sub)s ORDER BY o.id",
        {"sub": sub and f"{APP}/other/{sub}"},
    ).fetchall()
    return [r[0] for r in rows]


def deliver(conn: psycopg.Connection, message_id: str, at: datetime, *, retries: int = 0) -> None:
    """What the relay records on a 2xx at `at`, after `retries` failed attempts a day apart before it."""
    for n in range(retries, 0, -1):
        attempt(conn, message_id, at - timedelta(days=n), outcome="retry")
    attempt(conn, message_id, at)
    conn.execute(
        """
        WITH gone AS (DELETE FROM outbox WHERE message_id = %(m)s RETURNING *)
        INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber, body, attempts,
          created_at, first_attempt_at, delivered_at, status_code)
        SELECT message_id, transition_id, destination, app_id, subscriber, body, %(n)s, created_at, %(at)s, %(at)s, 200
        FROM gone
        """,
        {"m": message_id, "at": at, "n": retries + 1},
    )


def attempt(conn: psycopg.Connection, message_id: str, at: datetime, *, outcome: str = "delivered") -> None:
    conn.execute(
        "INSERT INTO outbox_attempts (message_id, attempted_at, status_code, outcome, response)"
        " VALUES (%s, %s, %s, %s, %s)",
        (message_id, at, 200 if outcome == "delivered" else 503, outcome, "{}"),
    )


def log_snapshot(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute("SELECT * FROM event_log ORDER BY position").fetchall()]


def count(conn: psycopg.Connection, sql: str, *params: Any) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def aged(conn: psycopg.Connection) -> Iterator[tuple[psycopg.Connection, datetime, dict[str, list[str]]]]:
    """Half the subscriptions delivered 100 days ago (past the 90-day default), half 10 days ago;
    one more whose two messages are still pending, each tried 40 and 35 days ago."""
    now = now_utc()
    load(conn, now - timedelta(days=101), range(SUBS // 2))
    load(conn, now - timedelta(days=11), range(SUBS // 2, SUBS))
    load(conn, now - timedelta(days=41), range(SUBS, SUBS + 1))
    old = [m for n in range(SUBS // 2) for m in message_ids(conn, f"s{n}")]
    young = [m for n in range(SUBS // 2, SUBS) for m in message_ids(conn, f"s{n}")]
    pending = message_ids(conn, f"s{SUBS}")
    for m in old:
        deliver(conn, m, now - timedelta(days=100), retries=1)
    for m in young:
        deliver(conn, m, now - timedelta(days=10), retries=1)
    for m in pending:
        attempt(conn, m, now - timedelta(days=40), outcome="retry")
        attempt(conn, m, now - timedelta(days=35), outcome="retry")
    conn.commit()
    yield conn, now, {"old": old, "young": young, "pending": pending}


def test_old_detail_is_pruned_in_batches_young_kept_log_untouched(aged: Any) -> None:
    conn, now, ids = aged
    log_before = log_snapshot(conn)
    delivered_rows = count(conn, "SELECT count(*) FROM outbox_delivered")

    result = prune(conn, Retention(batch=2), now, configured=CONFIGURED)

    assert result.complete and not result.dry_run
    # old: both attempts (retry + delivery); pending: the older one; young (11 and 10 days): none
    assert result.attempts == 2 * len(ids["old"]) + len(ids["pending"])
    assert result.delivered == len(ids["old"])
    assert result.batches >= result.attempts // 2 + result.delivered // 2  # two rows per transaction
    bodies = dict(conn.execute("SELECT message_id, body IS NOT NULL FROM outbox_delivered").fetchall())
    assert {m for m, has in bodies.items() if not has} == set(ids["old"])
    assert count(conn, "SELECT count(*) FROM outbox_delivered") == delivered_rows  # tombstones stay
    kept = conn.execute("SELECT message_id, attempted_at FROM outbox_attempts ORDER BY id").fetchall()
    assert {m for m, _ in kept} == set(ids["young"]) | set(ids["pending"])
    # the pending row keeps its latest attempt (why it waits) even though it is past the retention
    assert [a for m, a in kept if m in ids["pending"]] == [now - timedelta(days=35)] * len(ids["pending"])
    assert log_snapshot(conn) == log_before
    assert verify(conn).ok
    marks = retention.watermarks(conn)
    assert marks[retention.ATTEMPTS] == now - timedelta(days=30)
    assert marks[retention.DELIVERED] == now - timedelta(days=90)

    again = prune(conn, Retention(batch=2), now + timedelta(hours=1), configured=CONFIGURED)
    assert again.total == 0 and again.complete


def test_replay_after_pruning_enqueues_nothing(aged: Any) -> None:
    conn, now, ids = aged
    before = {r[0] for r in conn.execute("SELECT message_id FROM outbox UNION ALL"
                                         " SELECT message_id FROM outbox_delivered").fetchall()}
    prune(conn, Retention(), now, configured=CONFIGURED)
    # lose every derived row of a pruned subscription: replay re-derives its transitions and
    # re-renders its messages, and only the tombstones stop them from going out again
    key = f"{APP}/other/s0"
    conn.execute("DELETE FROM transitions WHERE subscription_key = %s", (key,))
    conn.execute("DELETE FROM subscriptions WHERE key = %s", (key,))
    conn.commit()

    report = replay(conn, POLICY, now)

    assert report.transitions == 2 and report.messages == 0
    after = {r[0] for r in conn.execute("SELECT message_id FROM outbox UNION ALL"
                                        " SELECT message_id FROM outbox_delivered").fetchall()}
    assert after == before
    assert count(conn, "SELECT count(*) FROM outbox") == len(ids["pending"])


def test_duplicate_receipts_pruned_by_age_and_the_audit_says_so(conn: psycopg.Connection) -> None:
    now = now_utc()
    load(conn, now - timedelta(days=120), range(1))
    receipts = [("custom", "p0", now - timedelta(days=119)), ("custom", "p0", now - timedelta(days=100)),
                ("custom", "p0", now - timedelta(days=5)), ("custom", "p0", now - timedelta(hours=1))]
    conn.cursor().executemany(
        "INSERT INTO duplicate_receipts (source, external_id, received_at) VALUES (%s, %s, %s)", receipts)
    conn.commit()
    assert audit.timeline(conn, "user-s0").pruned_before == {}

    result = prune(conn, Retention(batch=1), now, configured=CONFIGURED)

    assert result.duplicate_receipts == 2
    found = audit.timeline(conn, "user-s0")
    purchase = next(e for e in found.entries if e.external_id == "p0")
    assert purchase.duplicates == 2
    assert found.pruned_before[retention.DUPLICATES] == now - timedelta(days=90)
    # the app role cannot erase the last day's receipts, whatever cutoff it asks for
    conn.execute("SET ROLE subledger_app")
    gone = conn.execute("SELECT subledger_prune_duplicate_receipts(%s, 100)", (now + timedelta(days=1),)).fetchone()
    conn.execute("RESET ROLE")
    conn.commit()
    assert gone == (1,) and count(conn, "SELECT count(*) FROM duplicate_receipts") == 1


def test_the_app_role_can_prune_everything(aged: Any) -> None:
    conn, now, ids = aged
    conn.execute("SET ROLE subledger_app")
    conn.commit()
    result = prune(conn, Retention(), now, configured=CONFIGURED)
    assert result.complete and result.delivered == len(ids["old"])


def test_destination_state_only_unconfigured_unpaused_and_past_their_wait(conn: psycopg.Connection) -> None:
    now = now_utc()
    rows = [
        (APP, "segment", False, None, now - timedelta(days=400)),  # configured: never touched
        (APP, "removed", False, None, None),  # holds nothing
        (APP, "waiting", False, None, now - timedelta(days=1)),  # its wait ended recently
        (APP, "stopped", True, "paused by operator", None),  # a pause is lifted only by resume
        ("other.app", "auth", True, "401 Unauthorized", now - timedelta(days=400)),
        ("other.app", "old-wait", False, None, now - timedelta(days=40)),
    ]
    conn.cursor().executemany(
        "INSERT INTO destination_state (app_id, destination, paused, paused_reason, retry_after)"
        " VALUES (%s, %s, %s, %s, %s)", rows)
    conn.commit()

    unconfigured = prune(conn, Retention(), now, configured=())  # a run without the configuration
    assert unconfigured.destination_state == 0
    result = prune(conn, Retention(batch=1), now, configured=CONFIGURED)

    assert result.destination_state == 2
    left = {(a, d) for a, d in conn.execute("SELECT app_id, destination FROM destination_state").fetchall()}
    assert left == {(APP, "segment"), (APP, "waiting"), (APP, "stopped"), ("other.app", "auth")}


def test_timeline_and_explain_report_pruned_detail(aged: Any, db_url: str) -> None:
    conn, now, ids = aged
    prune(conn, Retention(), now, configured=CONFIGURED)
    old_user, young_user = "user-s0", f"user-s{SUBS - 1}"

    found = audit.timeline(conn, old_user)
    assert set(found.pruned_before) == {retention.ATTEMPTS, retention.DELIVERED}
    assert json.loads(json.dumps(audit.jsonable(found)))["pruned_before"][retention.DELIVERED]
    assert all(d.status == "delivered" for d in found.deliveries)  # still known as delivered
    assert audit.timeline(conn, young_user).pruned_before == {}

    runner = CliRunner()
    base = ["--database-url", db_url]
    table = runner.invoke(cli, ["audit", "timeline", old_user, *base], terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "delivery attempts before" in table.output and "pruned" in table.output
    young = runner.invoke(cli, ["audit", "timeline", young_user, *base], terminal_width=200)
    assert young.exit_code == 0 and "pruned" not in young.output
    explained = runner.invoke(cli, ["audit", "explain", ids["old"][0], *base], terminal_width=200)
    assert explained.exit_code == 0, explained.output
    assert "body pruned" in explained.output

    config = settings_module.from_dict({"api_token": "t"})
    with TestClient(create_app(build(config, database_url=db_url, clock=lambda: now))) as client:
        answer = client.get(f"/v1/audit/timeline/{old_user}", headers={"Authorization": "Bearer t"})
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["pruned_before"]) == {retention.ATTEMPTS, retention.DELIVERED}


def test_prune_cli_dry_run_counts_then_prunes_and_replay_sends_nothing(aged: Any, db_url: str) -> None:
    conn, _, ids = aged
    conn.commit()
    runner = CliRunner()
    base = ["--database-url", db_url]
    dry = runner.invoke(cli, ["prune", "--dry-run", "--json", *base])
    assert dry.exit_code == 0, dry.output
    counted = json.loads(dry.output)
    assert counted["dry_run"] and counted["outbox_delivered_bodies"] == len(ids["old"])
    assert counted["outbox_attempts"] == 2 * len(ids["old"]) + len(ids["pending"])
    assert count(conn, "SELECT count(*) FROM outbox_delivered WHERE body IS NULL") == 0
    conn.commit()

    done = runner.invoke(cli, ["prune", *base])
    assert done.exit_code == 0, done.output
    assert f"pruned {counted['outbox_attempts']} attempts, {len(ids['old'])} delivered bodies" in done.output
    assert count(conn, "SELECT count(*) FROM outbox_delivered WHERE body IS NULL") == len(ids["old"])
    conn.commit()
    replayed = runner.invoke(cli, ["replay", "--json", *base])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.output)["messages"] == 0


def test_one_pruner_at_a_time_and_a_locked_row_is_not_waited_for(
    aged: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, now, ids = aged
    with psycopg.connect(db_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (retention.PRUNE_LOCK,))
        busy = prune(conn, Retention(), now, configured=CONFIGURED)
        assert not busy.complete and busy.total == 0 and busy.incomplete == "another prune is running on this database"
        other.execute("SELECT pg_advisory_unlock(%s)", (retention.PRUNE_LOCK,))
    monkeypatch.setattr(retention, "LOCK_TIMEOUT", "100ms")
    with psycopg.connect(db_url) as holder:  # as a relay or an ingest holding an old row would
        holder.execute("SELECT 1 FROM outbox_delivered WHERE message_id = %s FOR UPDATE", (ids["old"][0],))
        blocked = prune(conn, Retention(batch=1), now, configured=CONFIGURED)
        assert not blocked.complete and blocked.incomplete == "a row was locked by another transaction"
        assert blocked.delivered < len(ids["old"])
        assert retention.DELIVERED not in retention.watermarks(conn)  # no promise for an unfinished pass
    finished = prune(conn, Retention(), now, configured=CONFIGURED)  # the advisory lock was released
    assert finished.complete and count(conn, "SELECT count(*) FROM outbox_delivered WHERE body IS NULL") == len(
        ids["old"])


def test_the_prune_job_is_registered_with_its_interval_and_prunes(aged: Any, db_url: str) -> None:
    _, now, ids = aged
    settings = settings_module.from_dict({
        "apps": {APP: {"destinations": {"segment": {"write_key": "k", "endpoint": "http://127.0.0.1:9"}}}},
        "retention": {"interval_minutes": 5, "delivered_days": 50, "batch_rows": 10},
    })
    services = build(settings, database_url=db_url, clock=lambda: now)
    scheduler = build_scheduler(services, build_relay(services), expirations=False)
    assert scheduler.retention == Retention(delivered=timedelta(days=50), batch=10)
    pruned = scheduler.prune_job()  # the configured destination's state is the relay's route
    assert pruned is not None and pruned.delivered == len(ids["old"])
    scheduler.start()
    try:
        job = scheduler._scheduler.get_job("prune")
        assert job is not None and job.trigger.interval == timedelta(minutes=5)
        assert job.next_run_time > datetime.now(UTC)  # not at start-up, after the short delay
    finally:
        scheduler.stop()

    off = settings_module.from_dict({"retention": {"enabled": False}})
    plain = Scheduler(db_url, Relay(db_url, {}), config=SchedulerConfig(expirations=False),
                      retention=build_scheduler(build(off, database_url=db_url), Relay(db_url, {})).retention)
    assert plain.retention is None
    plain.start()
    try:
        assert plain._scheduler.get_job("prune") is None
    finally:
        plain.stop()


def test_retention_settings_are_validated() -> None:
    defaults = settings_module.from_dict({}).retention.policy()
    assert (defaults.attempts, defaults.delivered, defaults.duplicate_receipts, defaults.destination_state) == (
        timedelta(days=30), timedelta(days=90), timedelta(days=90), timedelta(days=30))
    with pytest.raises(ConfigError) as bad:
        settings_module.from_dict({"retention": {"attempts_days": 0}})
    assert "retention.attempts_days" in str(bad.value)
    with pytest.raises(ConfigError):
        settings_module.from_dict({"retention": {"event_log_days": 10}})


def test_a_stop_ends_a_run_between_batches(aged: Any) -> None:
    conn, now, _ = aged
    stop = threading.Event()
    stop.set()
    result = prune(conn, Retention(batch=1), now, configured=CONFIGURED, stop=stop)
    assert not result.complete and result.total == 0
    assert retention.watermarks(conn) == {}  # no promise made for a pass that did not finish
