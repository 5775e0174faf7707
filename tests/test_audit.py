"""Audit queries: timeline, state at a time, explain, streamed export, stats — CLI, HTTP and store agree."""

from __future__ import annotations

import json
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
from subledger.core.events import parse_event
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.store import audit

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)  # the injected clock; every time below is relative to it
IN_TRIAL = (NOW - timedelta(hours=58)).isoformat()
A_DAY_AGO = (NOW - timedelta(hours=24)).isoformat()
APP = "com.example"
KEY = f"{APP}/other/sub1"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),
                                          Destination(name="rudder", app_id=APP))})
TOKEN = "audit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def item(eid: str, kind: str, hours_ago: float, sub: str = "sub1", **extra: Any) -> Incoming:
    data: dict[str, Any] = {
        "id": eid, "app_id": APP, "type": kind, "subscription_id": sub, "app_user_id": "u1",
        "occurred_at": (NOW - timedelta(hours=hours_ago)).isoformat(),
    }
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price="9.99", currency="USD")
    data.update(extra)
    return Incoming(Notification.of(parse_event(data)), json.dumps(data).encode())


def deliver(conn: psycopg.Connection, message_id: str, *, tries: int = 1) -> None:
    """What the relay records on a 2xx after `tries` attempts (the relay has its own tests)."""
    for n in range(tries):
        ok = n == tries - 1
        conn.execute(
            "INSERT INTO outbox_attempts (message_id, attempted_at, status_code, outcome, response)"
            " VALUES (%s, %s, %s, %s, %s)",
            (message_id, NOW + timedelta(seconds=n), 200 if ok else 503, "delivered" if ok else "retry",
             '{"success":true}' if ok else "Service Unavailable"),
        )
    conn.execute(
        """
        WITH gone AS (DELETE FROM outbox WHERE message_id = %s RETURNING *)
        INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber, body, attempts,
          created_at, first_attempt_at, delivered_at, status_code)
        SELECT message_id, transition_id, destination, app_id, subscriber, body, %s, created_at, %s, %s, 200
        FROM gone
        """,
        (message_id, tries, NOW, NOW + timedelta(seconds=tries)),
    )
    conn.commit()


@pytest.fixture
def ledger(conn: psycopg.Connection) -> psycopg.Connection:
    """A trial that converted, a duplicate delivery, a late event that superseded a transition."""
    ingest(conn, [item("a1", "purchase", 60, period_type="trial")], POLICY, NOW)
    ingest(conn, [item("a1", "purchase", 60, period_type="trial")], POLICY, NOW)  # duplicate delivery
    ingest(conn, [item("a3", "auto_renew_disabled", 30)], POLICY, NOW)
    # late: the renewal happened before the cancellation, so the trial_cancelled becomes a cancellation
    ingest(conn, [item("a2", "renewal", 50)], POLICY, NOW)
    ingest(conn, [item("b1", "purchase", 5, sub="other-sub", app_user_id="u2")], POLICY, NOW)
    converted = conn.execute(
        "SELECT message_id FROM outbox WHERE destination = 'segment' AND body->0->>'event' = 'rc_trial_converted_event'"
    ).fetchone()
    assert converted is not None
    deliver(conn, converted[0], tries=2)
    conn.execute(
        "UPDATE outbox SET status = 'dead', attempts = 1, last_status = 400, last_error = 'bad' "
        "WHERE destination = 'rudder' AND body->0->>'event' = 'rc_trial_started_event'"
    )
    conn.commit()
    return conn


def test_timeline_lists_entries_transitions_and_deliveries(ledger: psycopg.Connection) -> None:
    found = audit.timeline(ledger, "u1")
    assert found.subscriptions == [KEY]
    assert [e.external_id for e in found.entries] == ["a1", "a2", "a3"]
    assert [e.duplicates for e in found.entries] == [1, 0, 0]
    kinds = [(t.kind, t.superseded) for t in found.transitions]
    assert kinds == [("trial_started", False), ("trial_converted", False), ("trial_cancelled", True),
                     ("cancellation", False)]
    by_status: dict[str, list[audit.Delivery]] = {}
    for d in found.deliveries:
        by_status.setdefault(d.status, []).append(d)
    delivered = by_status["delivered"]
    assert len(delivered) == 1 and delivered[0].event == "rc_trial_converted_event"
    assert delivered[0].attempts == 2 and delivered[0].last_attempt_status == 200
    assert delivered[0].last_response == '{"success":true}'
    assert [d.last_status for d in by_status["dead"]] == [400]
    # the superseded transition's messages were withdrawn: none left for it
    superseded = {t.id for t in found.transitions if t.superseded}
    assert not any(d.transition_id in superseded for d in found.deliveries)
    assert len(found.deliveries) == 6  # 3 live transitions x 2 destinations


def test_timeline_by_subscription_key_and_anonymous_name(ledger: psycopg.Connection) -> None:
    assert audit.timeline(ledger, KEY).subscriptions == [KEY]
    assert audit.timeline(ledger, f"anon:{KEY}").subscriptions == [KEY]
    assert audit.timeline(ledger, "nobody").subscriptions == []


def test_state_at_folds_only_what_had_happened(ledger: psycopg.Connection) -> None:
    during_trial = audit.state_at(ledger, KEY, NOW - timedelta(hours=55))
    assert during_trial is not None and during_trial.state is not None
    assert during_trial.events_applied == 1 and during_trial.state.status == "trial"
    after = audit.state_at(ledger, KEY, NOW)
    assert after is not None and after.state is not None
    assert after.state.status == "cancelled"
    assert [t.kind.value for t in after.transitions] == ["trial_started", "trial_converted", "cancellation"]
    before = audit.state_at(ledger, KEY, NOW - timedelta(days=30))
    assert before is not None and before.state is None
    assert audit.state_at(ledger, "no/such/key", NOW) is None


def test_explain_walks_entry_transition_messages_attempts(ledger: psycopg.Connection) -> None:
    found = audit.timeline(ledger, "u1")
    converted = next(t for t in found.transitions if t.kind == "trial_converted")
    why = audit.explain(ledger, converted.id)
    assert why is not None
    assert why.entry is not None and why.entry["external_id"] == "a2"
    assert json.loads(why.entry["raw"])["id"] == "a2"
    assert why.fact is not None and why.fact["type"] == "renewal"
    assert sorted(m["destination"] for m in why.messages) == ["rudder", "segment"]
    assert [a["outcome"] for a in why.attempts] == ["retry", "delivered"]
    # a messageId (track or identify) leads to the same transition
    track = next(m["message_id"] for m in why.messages if m["destination"] == "segment")
    for ref in (track, track[:-2] + ".i"):
        again = audit.explain(ledger, ref)
        assert again is not None and again.transition["id"] == converted.id
    superseded = next(t for t in found.transitions if t.superseded)
    gone = audit.explain(ledger, superseded.id)
    assert gone is not None and gone.superseded and gone.messages == []
    assert audit.explain(ledger, "tr_nope") is None


def test_events_filters_and_streams_through_a_server_side_cursor(ledger: psycopg.Connection) -> None:
    every = list(audit.events(ledger, audit.EventFilter()))
    assert [e["external_id"] for e in every] == ["a1", "a3", "a2", "b1"]  # log order
    assert [e["external_id"] for e in audit.events(ledger, audit.EventFilter(type="renewal"))] == ["a2"]
    assert [e["external_id"] for e in audit.events(ledger, audit.EventFilter(subscriber="u2"))] == ["b1"]
    window = audit.EventFilter(since=NOW - timedelta(hours=55), until=NOW - timedelta(hours=10))
    assert [e["external_id"] for e in audit.events(ledger, window)] == ["a3", "a2"]
    assert list(audit.events(ledger, audit.EventFilter(app_id="other.app"))) == []
    stream = audit.events(ledger, audit.EventFilter())
    next(stream)
    cursors = [r[0] for r in ledger.execute("SELECT name FROM pg_cursors").fetchall()]
    assert "subledger_audit_events" in cursors
    stream.close()


def test_stats_counts_and_outbox_health(ledger: psycopg.Connection) -> None:
    found = audit.stats(ledger, NOW - timedelta(days=1), NOW + timedelta(minutes=1), NOW + timedelta(minutes=5))
    assert sum(r["entries"] for r in found.log) == 4
    assert found.duplicates == [{"source": "custom", "duplicates": 1}]
    by_kind = {r["kind"]: (r["live"], r["superseded"]) for r in found.transitions}
    assert by_kind["trial_cancelled"] == (0, 1) and by_kind["initial_purchase"] == (1, 0)
    assert (found.pending, found.dead, found.delivered) == (6, 1, 1)
    assert found.oldest_pending_seconds == pytest.approx(300)
    assert found.latency_seconds["p50"] == pytest.approx(2.0)
    assert found.paused == []


@pytest.fixture
def client(ledger: psycopg.Connection, db_url: str) -> Iterator[TestClient]:
    config = settings_module.from_dict({"api_token": TOKEN})
    with TestClient(create_app(build(config, database_url=db_url, clock=lambda: NOW))) as c:
        yield c


def test_http_mirrors_the_queries(client: TestClient) -> None:
    timeline = client.get("/v1/audit/timeline/u1", headers=AUTH)
    assert timeline.status_code == 200, timeline.text
    body = timeline.json()
    assert body["subscriptions"] == [KEY] and len(body["transitions"]) == 4
    assert [t["superseded"] for t in body["transitions"]] == [False, False, True, False]
    by_key = client.get(f"/v1/audit/timeline/{KEY}", headers=AUTH)
    assert by_key.json()["subscriptions"] == [KEY]
    state = client.get(f"/v1/audit/state/{KEY}", params={"at": IN_TRIAL}, headers=AUTH)
    assert state.status_code == 200 and state.json()["state"]["status"] == "trial"
    tid = body["transitions"][1]["id"]
    explained = client.get(f"/v1/audit/explain/{tid}", headers=AUTH).json()
    assert explained["entry"]["external_id"] == "a2" and len(explained["messages"]) == 2
    lines = client.get("/v1/audit/events", params={"subscriber": "u1"}, headers=AUTH).text.splitlines()
    assert [json.loads(x)["external_id"] for x in lines] == ["a1", "a3", "a2"]
    stats = client.get("/v1/audit/stats", params={"since": A_DAY_AGO}, headers=AUTH).json()
    assert stats["pending"] == 6 and stats["dead"] == 1
    for missing in ("/v1/audit/timeline/nobody", "/v1/audit/state/a/b/c", "/v1/audit/explain/tr_nope"):
        response = client.get(missing, headers=AUTH)
        assert response.status_code == 404 and "error" in response.json()
    assert client.get("/v1/audit/stats").status_code == 401


def test_cli_json_and_tables(ledger: psycopg.Connection, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from subledger.app.cli import audit as cli_audit

    monkeypatch.setattr(cli_audit, "out", Console(width=250))
    runner = CliRunner()
    base = ["--database-url", db_url]
    result = runner.invoke(cli, ["audit", "timeline", "u1", "--json", *base])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["subscriptions"] == [KEY]
    table = runner.invoke(cli, ["audit", "timeline", "u1", *base])
    assert table.exit_code == 0 and "SUPERSEDED" in table.stdout and "rc_trial_converted_event" in table.stdout
    state = runner.invoke(cli, ["audit", "state", KEY, "--at", IN_TRIAL, "--json", *base])
    assert json.loads(state.stdout)["state"]["status"] == "trial"
    tid = json.loads(result.stdout)["transitions"][1]["id"]
    explained = runner.invoke(cli, ["audit", "explain", tid, *base])
    assert explained.exit_code == 0 and "log entry #" in explained.stdout and "attempt" in explained.stdout
    events = runner.invoke(cli, ["audit", "events", "--type", "purchase", *base])
    assert [json.loads(x)["external_id"] for x in events.stdout.splitlines()] == ["a1", "b1"]
    stats = runner.invoke(cli, ["audit", "stats", "--since", "2026-01-01", "--until", "2027-01-01", "--json", *base])
    assert json.loads(stats.stdout)["dead"] == 1
    missing = runner.invoke(cli, ["audit", "timeline", "nobody", *base])
    assert missing.exit_code == 1
    bad = runner.invoke(cli, ["audit", "state", KEY, "--at", "yesterday", *base])
    assert bad.exit_code == 2


def test_cli_prints_stored_text_as_itself_never_as_markup(conn: psycopg.Connection, db_url: str) -> None:
    """Ids and reasons come from webhooks and API callers: "[/i]" in them is text, not a style tag
    (it once made `audit timeline`, `explain`, `state`, `outbox list` and `stats` tracebacks)."""
    sub = "s[/x]1"
    outcomes = ingest(conn, [item("mk[/bold]1", "purchase", 2, sub=sub, app_user_id="evil[/i]user")], POLICY, NOW)
    (transition,) = outcomes[0].transitions
    runner = CliRunner()
    base = ["--database-url", db_url]
    for args in (["audit", "timeline", "evil[/i]user"], ["audit", "explain", transition],
                 ["audit", "state", f"{APP}/other/{sub}"], ["outbox", "list"],
                 ["outbox", "pause", APP, "--reason", "[/b]oops"], ["audit", "stats"]):
        result = runner.invoke(cli, [*args, *base])
        assert result.exit_code == 0, (args, result.output, result.exception)
    timeline = runner.invoke(cli, ["audit", "timeline", "evil[/i]user", *base], env={"COLUMNS": "250"})
    assert "evil[/i]user" in timeline.output and "mk[/bold]1" in timeline.output
    assert "[/b]oops" in runner.invoke(cli, ["audit", "stats", *base], env={"COLUMNS": "250"}).output
