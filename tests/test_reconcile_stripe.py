"""Stripe reconciliation end to end: webhooks dropped, `/v1/events` read from a fake Stripe on 127.0.0.1,
the lost facts logged (arrival = reconciliation), published once, and never recovered twice."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fake_stripe_api import API_KEY, FakeStripe
from test_source_stripe import USER, event, invoice, subscription
from typer.testing import CliRunner
from webhooks_support import STRIPE_APP, Pipeline, config_dict, stripe_headers, write_root

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.cli import app as cli
from subledger.app.reconcile import reconcile_stripe
from subledger.app.sources import build_sources
from subledger.app.stripe_api import StripeEvents
from subledger.core.errors import SourceUnavailable
from subledger.core.events import parse_event
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.store import reconciliation
from subledger.store.verify import verify

TOKEN = "audit-token"
PATH = f"/webhooks/stripe/{STRIPE_APP}"


def lifecycle(now: datetime) -> list[dict[str, Any]]:
    """A purchase two days ago, its renewal yesterday, auto-renew switched off two hours ago, one
    unrelated event; all younger than the 72 h horizon, so every fact is news whichever way it arrives."""
    t = now.replace(microsecond=0)
    start, renew = t - timedelta(days=2), t - timedelta(days=1)
    paid = invoice(invoice_id="in_start", billing_reason="subscription_create", period_start=start,
                   period_end=renew, created=start)
    cycle = invoice(invoice_id="in_renew", period_start=renew, period_end=renew + timedelta(days=30), created=renew)
    off = subscription(start=start, period_start=renew, period_end=renew + timedelta(days=30),
                       cancel_at_period_end=True, cancellation_reason="cancellation_requested")
    return [
        event("invoice.paid", paid, event_id="evt_start", created=start),
        event("customer.updated", {"id": "cus_1", "object": "customer"}, event_id="evt_noise",
              created=start + timedelta(minutes=1)),
        event("invoice.paid", cycle, event_id="evt_renew", created=renew),
        event("customer.subscription.updated", off, event_id="evt_cancel", created=t - timedelta(hours=2),
              previous={"cancel_at_period_end": False}),
    ]


DROPPED = {"evt_renew", "evt_cancel"}


def settings_for(segment_url: str, stripe_url: str, root: Path) -> Any:
    raw = config_dict(root, segment_url)
    app = raw["apps"][STRIPE_APP]
    app["stripe"].update(api_key=API_KEY, api_base_url=stripe_url)
    app["destinations"]["segment"]["publish_historical"] = False
    raw["api_token"] = TOKEN
    return settings_module.from_dict(raw)


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[tuple[Pipeline, list[dict[str, Any]]]]:
    """A pipeline whose Stripe app reads a fake Stripe holding the lifecycle; the fake's failed set is DROPPED."""
    from fake_segment import FakeSegment
    from fastapi.testclient import TestClient

    from subledger.app.http import create_app

    events = lifecycle(datetime.now(UTC))
    with FakeSegment() as segment, FakeStripe(events, set(DROPPED), page_size=1) as stripe:
        settings = settings_for(segment.url, stripe.url, write_root(tmp_path))
        with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
            pipeline = Pipeline(client, segment, settings, db_url)
            pipeline.stripe = stripe  # type: ignore[attr-defined]
            yield pipeline, events


def push(p: Pipeline, events: list[dict[str, Any]], skip: set[str]) -> None:
    for evt in events:
        if evt["id"] not in skip:
            raw = json.dumps(evt, separators=(",", ":")).encode()
            assert p.post(PATH, raw, stripe_headers(raw))["result"] == "new"


def run(p: Pipeline, *, all_types: bool = False, dry_run: bool = False) -> dict[str, Any]:
    services = build(p.settings, database_url=p.db_url)
    api = StripeEvents(api_key=API_KEY, base_url=p.stripe.url, sleep=lambda _: None)  # type: ignore[attr-defined]
    try:
        with psycopg.connect(p.db_url) as conn:
            summary = reconcile_stripe(conn, build_sources(p.settings), api, STRIPE_APP, services.policy,
                                       datetime.now(UTC), all_types=all_types, dry_run=dry_run)
    finally:
        api.close()
    return summary.as_json()


def names(messages: list[dict[str, Any]]) -> list[str]:
    return sorted(m["event"] for m in messages if m["type"] == "track")


EXPECTED = sorted(["rc_initial_purchase_event", "rc_renewal_event", "rc_cancellation_event"])


def test_dropped_webhooks_are_recovered_published_once_and_never_twice(
    world: tuple[Pipeline, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    p, events = world
    push(p, events, skip=DROPPED)
    assert names(p.relay()) == ["rc_initial_purchase_event"]

    with caplog.at_level(logging.WARNING, logger="subledger.reconcile"):
        first = run(p)
    # 429 once, then two pages of one event each (the fake's page size), newest first
    assert (first["recovered"], first["duplicates"], first["pages"], first["api_calls"], first["throttled"]) == (
        2, 0, 2, 3, 1)
    assert first["recovered_ids"] == ["evt_renew", "evt_cancel"]  # ingested oldest first
    assert any("recovered 2 stripe event(s)" in r.getMessage() and STRIPE_APP in r.getMessage()
               for r in caplog.records)
    received = p.relay()
    assert names(received) == EXPECTED  # each once: Pipeline.relay asserts no duplicate messageId

    again = run(p, all_types=True)
    assert (again["recovered"], again["duplicates"], again["listed"]) == (0, 4, 4)
    assert len(p.relay()) == len(received)

    with psycopg.connect(p.db_url) as conn:
        arrivals = dict(conn.execute("SELECT external_id, arrival FROM event_log").fetchall())
        assert arrivals == {"evt_start": "push", "evt_noise": "push", "evt_renew": "reconciliation",
                            "evt_cancel": "reconciliation"}
        assert reconciliation.recovered_counts(conn) == {(STRIPE_APP, "stripe"): 2}
        assert reconciliation.cursor(conn, "stripe/failures", STRIPE_APP) is not None
        assert verify(conn).ok
    metrics = p.client.get("/metrics").text
    assert f'subledger_reconciliation_recovered_total{{app_id="{STRIPE_APP}",source="stripe"}} 2.0' in metrics

    # how each fact arrived: in the timeline, and as an `audit events` filter (HTTP and CLI)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    timeline = p.client.get(f"/v1/audit/timeline/{USER}", headers=auth).json()
    assert {e["external_id"]: e["arrival"] for e in timeline["entries"]} == {
        "evt_start": "push", "evt_renew": "reconciliation", "evt_cancel": "reconciliation"}
    lines = p.client.get("/v1/audit/events", params={"arrival": "reconciliation"}, headers=auth).text.splitlines()
    assert [json.loads(line)["external_id"] for line in lines] == ["evt_renew", "evt_cancel"]
    refused = p.client.get("/v1/audit/events", params={"arrival": "carrier-pigeon"}, headers=auth)
    assert refused.status_code == 422 and refused.json()["field"] == "arrival"
    cli_lines = CliRunner().invoke(cli, ["audit", "events", "--arrival", "push", "--database-url", p.db_url])
    assert cli_lines.exit_code == 0, cli_lines.output
    assert [json.loads(line)["external_id"] for line in cli_lines.stdout.splitlines()] == ["evt_start", "evt_noise"]


def test_with_every_webhook_delivered_reconciliation_recovers_nothing(
    world: tuple[Pipeline, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    p, events = world
    push(p, events, skip=set())
    assert names(p.relay()) == EXPECTED
    with caplog.at_level(logging.WARNING, logger="subledger.reconcile"):
        failures, everything = run(p), run(p, all_types=True)
    assert (failures["recovered"], failures["duplicates"]) == (0, 2)
    assert (everything["recovered"], everything["duplicates"]) == (0, 4)
    assert not [r for r in caplog.records if "recovered" in r.getMessage()]
    assert names(p.relay()) == EXPECTED


def test_dry_run_writes_nothing_and_the_cli_prints_a_json_summary(
    world: tuple[Pipeline, list[dict[str, Any]]], tmp_path: Path
) -> None:
    p, events = world
    push(p, events, skip=DROPPED)
    dry = run(p, dry_run=True)
    assert (dry["recovered"], dry["dry_run"]) == (2, True)
    with psycopg.connect(p.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (2,)
        assert reconciliation.cursor(conn, "stripe/failures", STRIPE_APP) is None

    config = tmp_path / "subledger.toml"
    stripe = p.settings.apps[STRIPE_APP].stripe
    config.write_text(
        f'[apps."{STRIPE_APP}".stripe]\nendpoint_secrets = {json.dumps(stripe.endpoint_secrets)}\n'
        f'api_key = "${{STRIPE_TEST_KEY}}"\napi_base_url = "{p.stripe.url}"\n'  # type: ignore[attr-defined]
    )
    runner = CliRunner()
    env = {"STRIPE_TEST_KEY": API_KEY}
    result = runner.invoke(cli, ["reconcile", "stripe", "--json", "--config", str(config), "--database-url",
                                 p.db_url], env=env)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["app_id"], body["recovered"], body["duplicates"], body["mode"]) == (STRIPE_APP, 2, 0, "failures")
    assert set(body) >= {"pages", "api_calls", "since", "listed", "refused"}
    again = runner.invoke(cli, ["reconcile", "stripe", "--app", STRIPE_APP, "--config", str(config),
                                "--database-url", p.db_url], env=env)
    assert again.exit_code == 0 and "recovered 0 events, 2 already logged" in again.stdout
    unknown = runner.invoke(cli, ["reconcile", "stripe", "--app", "nope", "--config", str(config),
                                  "--database-url", p.db_url], env=env)
    assert unknown.exit_code == 2 and "has no Stripe API key" in unknown.stderr
    refused = runner.invoke(cli, ["reconcile", "stripe", "--config", str(config), "--database-url", p.db_url],
                            env={"STRIPE_TEST_KEY": "rk_wrong"})
    assert refused.exit_code == 1 and "refused the API key" in refused.stderr and "Traceback" not in refused.output


# -- the publishing rule, on the ingest path alone ------------------------------------------------

APP = "com.example"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),)},
                      reconciliation_horizon=timedelta(days=30))


def _incoming(eid: str, age: timedelta, now: datetime, arrival: str) -> Incoming:
    data = {"id": eid, "app_id": APP, "type": "purchase", "subscription_id": eid, "app_user_id": "u",
            "occurred_at": (now - age).isoformat(), "product_id": "monthly", "price": "9.99", "currency": "USD"}
    return Incoming(Notification.of(parse_event(data)), json.dumps(data).encode(), arrival=arrival)


def test_a_recovered_fact_is_news_up_to_the_limit_and_history_beyond(conn: psycopg.Connection) -> None:
    now = datetime.now(UTC)
    ingest(conn, [
        _incoming("pushed-10d", timedelta(days=10), now, "push"),
        _incoming("recovered-10d", timedelta(days=10), now, "reconciliation"),
        _incoming("recovered-31d", timedelta(days=31), now, "reconciliation"),
        _incoming("recovered-1h", timedelta(hours=1), now, "reconciliation"),
    ], POLICY, now)
    historical = dict(conn.execute("SELECT external_id, historical FROM event_log").fetchall())
    assert historical == {"pushed-10d": True, "recovered-10d": False, "recovered-31d": True, "recovered-1h": False}
    # published (an outbox row) with its true occurred_at; the pushed one and the 31-day-old one are not
    published = conn.execute("SELECT l.external_id, t.occurred_at FROM outbox o JOIN transitions t ON t.id = "
                             "o.transition_id JOIN event_log l ON l.position = t.log_position").fetchall()
    assert sorted(e for e, _ in published) == ["recovered-10d", "recovered-1h"]
    when = dict(published)["recovered-10d"]
    assert abs(when - (now - timedelta(days=10))) < timedelta(seconds=1)


def test_an_edited_arrival_is_caught_and_a_push_hashes_as_before(conn: psycopg.Connection) -> None:
    now = datetime.now(UTC)
    ingest(conn, [_incoming("p", timedelta(hours=1), now, "push"),
                  _incoming("r", timedelta(hours=1), now, "reconciliation")], POLICY, now)
    assert verify(conn).ok
    conn.execute("ALTER TABLE event_log DISABLE TRIGGER USER")
    conn.execute("UPDATE event_log SET arrival = 'push' WHERE external_id = 'r'")
    conn.execute("ALTER TABLE event_log ENABLE TRIGGER USER")
    conn.commit()
    result = verify(conn)
    assert not result.ok and result.first_bad_position == 2


def test_a_page_that_fails_once_is_retried_and_a_broken_answer_stops_the_run_writing_nothing(
    db_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    events = lifecycle(now)
    with FakeStripe(events, set(DROPPED), page_size=1, throttle=0, faults={2: 503}) as stripe:
        api = StripeEvents(api_key=API_KEY, base_url=stripe.url, sleep=lambda _: None)
        pages = [e["id"] for page in api.pages(now - timedelta(days=30), failures_only=True) for e in page.events]
        api.close()
        assert pages == ["evt_cancel", "evt_renew"]
        assert (api.calls.requests, api.calls.pages) == (3, 2)  # page 2 failed once, then answered
        assert stripe.requests[2]["starting_after"] == ["evt_cancel"]
    with FakeStripe(events, set(DROPPED), throttle=0, faults={1: 200}) as stripe, \
            psycopg.connect(db_url) as conn:
        settings = settings_for("http://127.0.0.1:9", stripe.url, write_root(tmp_path))
        api = StripeEvents(api_key=API_KEY, base_url=stripe.url, sleep=lambda _: None)
        with pytest.raises(SourceUnavailable, match="not a list of events"):
            reconcile_stripe(conn, build_sources(settings), api, STRIPE_APP, IngestPolicy(), now)
        api.close()
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (0,)
        assert reconciliation.cursor(conn, "stripe/failures", STRIPE_APP) is None
