"""The fault matrix: 500s, 429 with Retry-After, timeouts, resets, a poison message, 401, late redelivery."""

from __future__ import annotations

import logging
import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fake_segment import (
    FakeSegment,
    ingest_events,
    lifecycle,
    outbox_counts,
    routes_for,
    settings_for,
)
from fastapi.testclient import TestClient

from subledger.app.bootstrap import build
from subledger.core.delivery import Backoff
from subledger.outbox import metrics
from subledger.outbox.relay import Relay, RelayConfig
from subledger.outbox.sink import Reply, Reset
from subledger.store.outbox import resume_destinations

FAST = RelayConfig(backoff=Backoff(0.02, 0.1), lease=timedelta(seconds=30))


def _relay(db_url: str, settings: Any, config: RelayConfig = FAST, **kw: Any) -> Relay:
    return Relay(db_url, routes_for(settings), config, **kw)


def _attempts(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT message_id, status_code, outcome, response FROM outbox_attempts ORDER BY id"
        ).fetchall()


def test_500s_are_retried_with_backoff(db_url: str) -> None:
    with FakeSegment() as fake:
        fake.then(Reply(500, {"error": "boom"}), Reply(502, "bad gateway"), Reply(503, {}))
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1) + lifecycle(2))
        stats = _relay(db_url, settings).drain_all(timeout=20)
        assert fake.capture.distinct() == 24 and fake.capture.duplicates() == {}
    assert stats.retried >= 3
    outcomes = [(a[1], a[2]) for a in _attempts(db_url)]
    assert (500, "retry") in outcomes and (502, "retry") in outcomes and (503, "retry") in outcomes
    assert outbox_counts(db_url) == {"delivered": 12}
    with psycopg.connect(db_url) as conn:
        counted = conn.execute("SELECT sum(attempts), max(attempts) FROM outbox_delivered").fetchone()
        recorded = conn.execute("SELECT count(*) FROM outbox_attempts").fetchone()
    assert counted is not None and recorded is not None
    assert counted[0] == recorded[0]  # every attempt is both counted on its row and recorded
    assert counted[1] >= 2


def test_429_pauses_the_destination_for_retry_after(db_url: str) -> None:
    with FakeSegment() as fake:
        fake.then(Reply(429, {"error": "rate limited"}, headers={"Retry-After": "1"}))
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1))
        relay = _relay(db_url, settings)
        first = relay.drain()
        assert first.retried == 1 and first.delivered == 0  # one subscriber: one row claimable at a time
        with psycopg.connect(db_url) as conn:
            state = conn.execute("SELECT retry_after FROM destination_state").fetchone()
        assert state is not None and state[0] > datetime.now(UTC) + timedelta(seconds=0.5)
        assert relay.drain().claimed == 0  # nothing is claimable while the destination waits
        relay.drain_all(timeout=10)
        requests = fake.seen_requests
        assert fake.capture.distinct() == 12
    assert requests[1].received_at - requests[0].received_at >= 0.95


def test_timeouts_are_retried(db_url: str) -> None:
    with FakeSegment() as fake:
        fake.then(Reply(200, delay=0.8), Reply(200, delay=0.8))
        settings = settings_for(fake.url, timeout_seconds=0.25)
        ingest_events(db_url, settings, lifecycle(1))
        stats = _relay(db_url, settings).drain_all(timeout=20)
        assert fake.capture.distinct() == 12
    assert stats.retried >= 2
    assert any("timeout" in (a[3] or "") for a in _attempts(db_url))


def test_connection_resets_are_retried(db_url: str) -> None:
    with FakeSegment() as fake:
        fake.then(Reset(), Reset(delay=0.05), None, Reset())
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1) + lifecycle(2))
        _relay(db_url, settings).drain_all(timeout=20)
        assert fake.capture.distinct() == 24
    assert sum(1 for a in _attempts(db_url) if a[1] is None and a[2] == "retry") >= 3


def test_a_poison_message_in_a_batch_is_isolated_and_dead_lettered(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, [e for n in range(40) for e in lifecycle(n, renewals=0)])
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "SELECT message_id, body->1->>'messageId' FROM outbox WHERE subscriber = 'user-s000017'"
                " ORDER BY id LIMIT 1"
            ).fetchone()
        assert rows is not None
        poison_row, poison_identify = rows
        fake.poison.add(poison_identify)
        stats = _relay(db_url, settings).drain_all(timeout=20)
        assert fake.capture.distinct() == (160 - 1) * 2
        assert not fake.capture.counts.get(poison_row)
    assert stats.dead == 1
    with psycopg.connect(db_url) as conn:
        dead = conn.execute("SELECT message_id, last_status, last_error FROM outbox WHERE status = 'dead'").fetchall()
    assert dead == [(poison_row, 400, f'400: {{"error": "invalid message {poison_identify}"}}')]
    # 40 first rows in one batch, bisected: about 2 log2(40) requests, not one per row.
    assert stats.requests <= 4 * 2 + 2 * 6 + 2


def test_jitsu_partial_refusal_dead_letters_only_the_refused(db_url: str) -> None:
    with FakeSegment(jitsu=True) as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, [e for n in range(10) for e in lifecycle(n, renewals=0)])
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT message_id FROM outbox ORDER BY id LIMIT 1").fetchone()
        assert row is not None
        fake.poison.add(row[0])
        stats = _relay(db_url, settings).drain_all(timeout=10)
        assert fake.capture.duplicates() == {}
    assert stats.dead == 1 and stats.delivered == 39
    assert outbox_counts(db_url) == {"dead": 1, "delivered": 39}


def test_401_pauses_the_destination_and_rows_stay_pending(db_url: str) -> None:
    with FakeSegment(write_keys={"the-right-key"}) as fake:
        settings = settings_for(fake.url)  # configured with WRITE_KEY, which the endpoint refuses
        ingest_events(db_url, settings, lifecycle(1) + lifecycle(2))
        stats = _relay(db_url, settings).drain_all(timeout=5)
        assert stats.delivered == 0 and stats.requests == 1
        assert outbox_counts(db_url) == {"pending": 12, "delivered": 0}
        with psycopg.connect(db_url) as conn:
            state = conn.execute("SELECT paused, paused_reason FROM destination_state").fetchone()
        assert state is not None and state[0] and "401" in state[1]
        assert _relay(db_url, settings).drain().claimed == 0  # paused: nothing is claimed

        services = build(settings, database_url=db_url)
        from subledger.app.http import create_app

        with TestClient(create_app(services)) as client:
            ready = client.get("/readyz").json()
        assert ready["status"] == "degraded" and ready["pending"] == 12
        assert ready["paused_destinations"][0]["destination"] == "segment"

        # The operator fixes the key in the config: the destination resumes on its own.
        fixed = settings_for(fake.url, write_key="the-right-key")
        _relay(db_url, fixed).drain_all(timeout=10)
        assert fake.capture.distinct() == 24
        assert outbox_counts(db_url) == {"delivered": 12}


def test_manual_resume(db_url: str) -> None:
    with FakeSegment() as fake:
        fake.then(Reply(403, {"error": "forbidden"}))
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1))
        relay = _relay(db_url, settings)
        relay.drain_all(timeout=5)
        assert fake.capture.distinct() == 0
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert resume_destinations(conn, "com.test.app") == [("com.test.app", "segment")]
        relay.drain_all(timeout=10)
        assert fake.capture.distinct() == 12


def test_redelivery_past_24h_warns_and_counts(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    start = datetime.now(UTC)
    with FakeSegment() as fake:
        fake.then(Reply(500, {}))
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1, renewals=0), now=start)
        _relay(db_url, settings, clock=lambda: start).drain()
        before = metrics.REDELIVERIES_PAST_DEDUP.labels("com.test.app", "segment")._value.get()
        later = start + timedelta(hours=25)
        with caplog.at_level(logging.WARNING, logger="subledger.relay"):
            _relay(db_url, settings, clock=lambda: later).drain()
        after = metrics.REDELIVERIES_PAST_DEDUP.labels("com.test.app", "segment")._value.get()
        assert fake.capture.distinct() > 0
    assert after - before == 1
    assert any("24 h dedup window" in r.getMessage() for r in caplog.records)


def test_per_subscriber_order_holds_under_retries(db_url: str) -> None:
    rng = random.Random(7)
    with FakeSegment() as fake:
        faults: list[Any] = []
        for _ in range(120):
            roll = rng.random()
            faults.append(
                Reply(500, {}) if roll < 0.15 else Reset() if roll < 0.25
                else Reply(429, {}, headers={"Retry-After": "0.05"}) if roll < 0.3 else None
            )
        fake.then(*faults)
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, [e for n in range(30) for e in lifecycle(n, renewals=3)])
        relays = [_relay(db_url, settings, RelayConfig(batch_rows=7, backoff=Backoff(0.01, 0.05))) for _ in range(3)]
        threads = [threading.Thread(target=r.drain_all, kwargs={"timeout": 60}) for r in relays]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert fake.capture.distinct() == 30 * 7 * 2
        first_seen = fake.capture.first_seen()
        messages = fake.capture.messages()
    tracks = {m["messageId"]: m for m in messages if m["type"] == "track"}
    by_user: dict[str, list[tuple[float, str]]] = {}
    for mid, m in tracks.items():
        by_user.setdefault(m["userId"], []).append((first_seen[mid], m["timestamp"]))
    for user, seen in by_user.items():
        arrival = [ts for _, ts in sorted(seen)]
        assert arrival == sorted(arrival), f"{user} received out of order"
