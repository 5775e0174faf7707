"""Outbox operations: list, retry (same messageId; never-sent rows re-rendered), pause/resume honoured by the relay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from subledger.app import settings as settings_module
from subledger.app.bootstrap import Services, build
from subledger.app.cli import app as cli
from subledger.app.http import create_app
from subledger.core.events import parse_event
from subledger.core.sources import Notification
from subledger.outbox import ops
from subledger.outbox.ingest import Incoming, ingest

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
APP = "com.example"
TOKEN = "ops-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def item(eid: str, kind: str, sub: str, **extra: Any) -> Incoming:
    data: dict[str, Any] = {"id": eid, "app_id": APP, "type": kind, "subscription_id": sub, "app_user_id": sub,
                            "occurred_at": (NOW - timedelta(hours=1)).isoformat()}
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price="9.99", currency="USD")
    data.update(extra)
    return Incoming(Notification.of(parse_event(data)), json.dumps(data).encode())


def services_for(db_url: str, **destination: Any) -> Services:
    config = settings_module.from_dict({
        "api_token": TOKEN,
        "apps": {APP: {"destinations": {"segment": {"write_key": "k", "endpoint": "http://127.0.0.1:9",
                                                    **destination}}}},
    })
    return build(config, database_url=db_url, clock=lambda: NOW)


@pytest.fixture
def ledger(conn: psycopg.Connection, db_url: str) -> psycopg.Connection:
    """Three rows: one attempted and dead, one never sent and dead for a missing rate, one pending."""
    euro = services_for(db_url, currency="EUR", rates={"GBP": "1.2"})
    ingest(conn, [item("e1", "purchase", "s1", currency="GBP")], euro.policy, NOW)
    ingest(conn, [item("e2", "purchase", "s2")], euro.policy, NOW)  # USD: no rate → dead at render
    ingest(conn, [item("e3", "purchase", "s3", currency="GBP")], euro.policy, NOW)
    conn.execute("UPDATE outbox SET status = 'dead', attempts = 3, first_attempt_at = %s, last_status = 400,"
                 " last_error = 'invalid payload' WHERE subscriber = 's1'", (NOW,))
    conn.commit()
    return conn


def rows(conn: psycopg.Connection) -> dict[str, tuple[str, str, Any]]:
    return {r[0]: (r[1], r[2], r[3]) for r in
            conn.execute("SELECT subscriber, status, message_id, body FROM outbox ORDER BY id").fetchall()}


def test_list_filters_by_status(ledger: psycopg.Connection) -> None:
    assert [r["subscriber"] for r in ops.list_rows(ledger, status="dead")] == ["s1", "s2"]
    assert [r["subscriber"] for r in ops.list_rows(ledger, status="pending")] == ["s3"]
    assert len(ops.list_rows(ledger, limit=2)) == 2
    dead = ops.list_rows(ledger, status="dead")
    assert dead[1]["last_error"].startswith("no rate from USD to EUR")


def test_retry_keeps_sent_bodies_and_rerenders_never_sent_ones(ledger: psycopg.Connection, db_url: str) -> None:
    before = rows(ledger)
    still_euro = services_for(db_url, currency="EUR", rates={"GBP": "1.2"})
    with ledger.transaction():
        first = ops.retry(ledger, still_euro.policy, NOW, dead=True)
    assert first.requeued == [before["s1"][1]] and [m for m, _ in first.still_dead] == [before["s2"][1]]
    fixed = services_for(db_url, currency="EUR", rates={"GBP": "1.2", "USD": "0.5"})
    with ledger.transaction():
        second = ops.retry(ledger, fixed.policy, NOW, dead=True)
    assert second.rerendered == [before["s2"][1]]
    after = rows(ledger)
    assert {k: v[0] for k, v in after.items()} == {"s1": "pending", "s2": "pending", "s3": "pending"}
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}  # same messageIds
    assert after["s1"][2] == before["s1"][2]  # attempted: byte for byte
    assert after["s2"][2][0]["properties"]["revenue"] == 4.995 and after["s2"][2][0]["properties"]["currency"] == "EUR"
    with pytest.raises(ops.NotFound):
        ops.retry(ledger, fixed.policy, NOW, ref="sl-nope.t")


def test_pause_is_honoured_by_the_relay_until_resume(ledger: psycopg.Connection, db_url: str) -> None:
    from subledger.app.worker import build_relay

    services = services_for(db_url, currency="EUR", rates={"GBP": "1.2"})
    with ledger.transaction():
        ops.pause(ledger, APP, ops.known_destinations(ledger, services.policy, APP), NOW)
    paused = ledger.execute("SELECT destination, paused, paused_reason FROM destination_state").fetchall()
    assert paused == [("segment", True, ops.PAUSED_BY_OPERATOR)]
    ledger.commit()
    relay = build_relay(services)
    try:
        assert relay.run_pass().claimed == 0
        with ledger.transaction():
            assert ops.resume(ledger, APP) == [(APP, "segment")]
        assert relay.run_pass().claimed == 1  # the pending row; nothing listens there, so it is retried
    finally:
        relay.close()


@pytest.fixture
def client(ledger: psycopg.Connection, db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(services_for(db_url, currency="EUR", rates={"GBP": "1.2", "USD": "0.5"}))) as c:
        yield c


def test_http_outbox_operations(client: TestClient, ledger: psycopg.Connection) -> None:
    listed = client.get("/v1/outbox", params={"status": "dead"}, headers=AUTH)
    assert listed.status_code == 200 and len(listed.json()["rows"]) == 2
    assert client.get("/v1/outbox", params={"status": "gone"}, headers=AUTH).status_code == 422
    row_id = listed.json()["rows"][0]["id"]
    one = client.post(f"/v1/outbox/{row_id}/retry", headers=AUTH)
    assert one.status_code == 200, one.text
    assert len(one.json()["requeued"]) == 1
    rest = client.post("/v1/outbox/dead/retry", headers=AUTH)
    assert rest.json()["rerendered"] == [listed.json()["rows"][1]["message_id"]]
    assert client.post("/v1/outbox/sl-nope.t/retry", headers=AUTH).status_code == 404
    pending = ledger.execute("SELECT message_id FROM outbox WHERE subscriber = 's3'").fetchone()
    assert pending is not None
    ledger.execute(
        "WITH gone AS (DELETE FROM outbox WHERE message_id = %s RETURNING *) INSERT INTO outbox_delivered"
        " (message_id, transition_id, destination, app_id, subscriber, body, attempts, created_at, delivered_at)"
        " SELECT message_id, transition_id, destination, app_id, subscriber, body, 1, created_at, now() FROM gone",
        (pending[0],),
    )
    ledger.commit()
    assert client.post(f"/v1/outbox/{pending[0]}/retry", headers=AUTH).status_code == 409
    paused = client.post(f"/v1/outbox/pause/{APP}", headers=AUTH)
    assert paused.json() == {"paused": [{"app_id": APP, "destination": "segment"}]}
    assert client.get("/readyz").json()["paused_destinations"][0]["destination"] == "segment"
    resumed = client.post(f"/v1/outbox/resume/{APP}", params={"destination": "segment"}, headers=AUTH)
    assert resumed.json() == {"resumed": [{"app_id": APP, "destination": "segment"}]}


def test_cli_outbox_commands(ledger: psycopg.Connection, db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[apps."{APP}".destinations.segment]\nwrite_key = "k"\ncurrency = "EUR"\n'
                      'rates = { GBP = "1.2", USD = "0.5" }\n')
    runner = CliRunner()
    base = ["--config", str(config), "--database-url", db_url]
    listed = runner.invoke(cli, ["outbox", "list", "--status", "dead", "--json", *base])
    assert listed.exit_code == 0, listed.output
    assert [r["subscriber"] for r in json.loads(listed.stdout)] == ["s1", "s2"]
    assert runner.invoke(cli, ["outbox", "list", *base]).exit_code == 0
    assert runner.invoke(cli, ["outbox", "retry", *base]).exit_code == 2  # neither a row nor --dead
    retried = runner.invoke(cli, ["outbox", "retry", "--dead", "--json", *base])
    assert len(json.loads(retried.stdout)["requeued"]) == 2
    assert runner.invoke(cli, ["outbox", "retry", "sl-nope.t", *base]).exit_code == 1
    paused = runner.invoke(cli, ["outbox", "pause", APP, *base])
    assert paused.exit_code == 0 and f"paused {APP}/segment" in paused.stdout
    resumed = runner.invoke(cli, ["outbox", "resume", APP, "--destination", "segment", *base])
    assert f"resumed {APP}/segment" in resumed.stdout
    again = runner.invoke(cli, ["outbox", "resume", APP, *base])
    assert "nothing was paused" in again.stdout
