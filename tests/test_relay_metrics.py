"""`/metrics` and `/readyz` tell an operator what the relay is doing."""

from __future__ import annotations

import psycopg
from fake_segment import APP, FakeSegment, ingest_events, lifecycle, routes_for, settings_for
from fastapi.testclient import TestClient

from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.core.delivery import Backoff
from subledger.outbox.relay import Relay, RelayConfig
from subledger.outbox.sink import Reply


def _value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want if want else "")) or (not want and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_metrics_and_readyz(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1) + lifecycle(2))
        with psycopg.connect(db_url) as conn:
            conn.execute("UPDATE outbox SET status = 'dead', last_error = 'test'"
                         " WHERE id = (SELECT max(id) FROM outbox)")
        app = create_app(build(settings, database_url=db_url))
        with TestClient(app) as client:
            before = client.get("/metrics").text
            assert _value(before, "subledger_outbox_pending", app_id="com.test.app", destination="segment") == 11
            assert _value(before, "subledger_outbox_dead", app_id="com.test.app", destination="segment") == 1
            assert _value(before, "subledger_outbox_oldest_pending_seconds",
                          app_id="com.test.app", destination="segment") >= 0
            ready = client.get("/readyz").json()
            assert ready["pending"] == 11 and ready["dead"] == 1 and ready["status"] == "ok"
            try:  # the counter is per process: earlier tests may have counted other apps, or this one
                delivered_before = _value(before, "subledger_relay_delivered_total",
                                          app_id="com.test.app", destination="segment")
            except AssertionError:
                delivered_before = 0.0
            relay = Relay(db_url, routes_for(settings))
            relay.drain_all(timeout=10)
            relay.close()
            after = client.get("/metrics")
            assert after.headers["content-type"].startswith("text/plain")
            text = after.text
        # The relay ran in this process, so its counters show here (as they do under `serve`).
        assert _value(text, "subledger_relay_delivered_total",
                      app_id="com.test.app", destination="segment") - delivered_before == 11
        assert _value(text, "subledger_outbox_pending", app_id="com.test.app", destination="segment") == 0
        assert "subledger_delivery_latency_seconds_bucket" in text
        assert "subledger_relay_redeliveries_past_dedup_window_total" in text


def test_a_failing_destination_degrades_readyz_and_sets_its_gauge(db_url: str) -> None:
    """A 5xx marks the destination failing: `/readyz` says degraded and lists it, the gauge is 1;
    the probe's 2xx ends the outage and both go back (0, ok)."""
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1))
        fake.then(Reply(500, {"error": "boom"}))
        relay = Relay(db_url, routes_for(settings), RelayConfig(backoff=Backoff(0.02, 0.1)))
        try:
            relay.run_pass()
            with TestClient(create_app(build(settings, database_url=db_url))) as client:
                ready = client.get("/readyz").json()
                assert ready["status"] == "degraded" and ready["paused_destinations"] == []
                (failing,) = ready["failing_destinations"]
                assert (failing["app_id"], failing["destination"], failing["failures"]) == (APP, "segment", 1)
                assert "500" in failing["reason"] and failing["since"]
                down = client.get("/metrics").text
                assert _value(down, "subledger_destination_failing", app_id=APP, destination="segment") == 1
                relay.drain_all(timeout=10)
                ready = client.get("/readyz").json()
                assert (ready["status"], ready["failing_destinations"], ready["pending"]) == ("ok", [], 0)
                up = client.get("/metrics").text
                assert _value(up, "subledger_destination_failing", app_id=APP, destination="segment") == 0
        finally:
            relay.close()
