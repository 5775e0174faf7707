"""The relay without faults: everything arrives once per destination, as segment.md says it should."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from fake_segment import (
    APP,
    SANDBOX_KEY,
    WRITE_KEY,
    FakeSegment,
    ingest_events,
    lifecycle,
    outbox_counts,
    routes_for,
    settings_for,
)

from subledger.core.delivery import Backoff
from subledger.outbox.relay import Relay, RelayConfig

FAST = RelayConfig(backoff=Backoff(0.01, 0.05), lease=timedelta(seconds=30))
MESSAGE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ISO_MILLIS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _relay(db_url: str, settings: Any, config: RelayConfig = FAST) -> Relay:
    return Relay(db_url, routes_for(settings), config)


def _no_nulls(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, dict):
        return all(_no_nulls(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_nulls(v) for v in value)
    return True


def test_every_transition_arrives_once_per_destination(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url, destinations=("segment", "rudderstack"))
        events = [e for n in range(60) for e in lifecycle(n)]
        transitions = ingest_events(db_url, settings, events)
        assert transitions == 60 * 6
        relay = _relay(db_url, settings)
        stats = relay.drain_all(timeout=30)
        relay.close()
        destinations = 2
        assert stats.delivered == transitions * destinations
        # Each transition for each destination is one track + one identify.
        assert fake.capture.distinct() == transitions * destinations * 2
        assert fake.capture.duplicates() == {}
        assert fake.capture.conflicting() == {}
        assert outbox_counts(db_url) == {"delivered": transitions * destinations}
        with psycopg.connect(db_url) as conn:
            attempts = conn.execute("SELECT outcome, count(*) FROM outbox_attempts GROUP BY 1").fetchall()
            assert dict(attempts) == {"delivered": transitions * destinations}
            kept = conn.execute("SELECT body FROM outbox_delivered").fetchall()
        received = {m["messageId"]: m for m in fake.capture.messages()}
        for (body,) in kept:  # what was recorded as delivered is exactly what arrived
            for message in body:
                assert received[message["messageId"]] == message
        assert all(r.write_key == WRITE_KEY for r in fake.capture.requests)


def test_payloads_match_the_contract(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        events = lifecycle(1) + lifecycle(2, app_user=False)
        ingest_events(db_url, settings, events)
        _relay(db_url, settings).drain_all(timeout=10)
        messages = fake.capture.messages()
    tracks = [m for m in messages if m["type"] == "track"]
    identifies = [m for m in messages if m["type"] == "identify"]
    assert len(tracks) == len(identifies) == 12
    for m in messages:
        assert MESSAGE_ID.match(m["messageId"])
        assert ISO_MILLIS_Z.match(m["timestamp"])
        assert m["context"]["library"]["name"] == "subledger"
        assert m["context"]["environment"] == "production"
        assert _no_nulls(m)
        assert ("userId" in m) != ("anonymousId" in m)
    by_base = {m["messageId"][:-2] for m in tracks}
    assert by_base == {m["messageId"][:-2] for m in identifies}  # track and identify pair up
    names = Counter(m["event"] for m in tracks)
    assert names == {
        "rc_trial_started_event": 2, "rc_trial_converted_event": 2, "rc_renewal_event": 4,
        "rc_cancellation_event": 2, "rc_expiration_event": 2,
    }
    converted = next(m for m in tracks if m["event"] == "rc_trial_converted_event" and "userId" in m)
    assert converted["userId"] == "user-s000001"
    props = converted["properties"]
    assert props["revenue"] == 9.99 and props["currency"] == "USD"
    assert props["store"] == "APP_STORE" and props["environment"] == "PRODUCTION"
    assert isinstance(props["expires_at"], int)
    anonymous = [m for m in messages if "anonymousId" in m]
    assert len(anonymous) == 12 and all(m["anonymousId"].startswith("anon:") for m in anonymous)
    statuses = [m["traits"].get("subscription_status") for m in identifies if m.get("userId") == "user-s000001"]
    assert statuses == ["trial", "active", "active", "active", "cancelled", "expired"]


def test_revenue_mode_after_commission(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url, revenue_mode="after_commission")
        ingest_events(db_url, settings, lifecycle(1))
        _relay(db_url, settings).drain_all(timeout=10)
        revenue = [m["properties"]["revenue"] for m in fake.capture.messages()
                   if m["type"] == "track" and "revenue" in m["properties"]]
    assert revenue == [pytest.approx(9.99 * 0.7)] * 3  # App Store, first paid year: 30 % commission


def test_sandbox_messages_use_the_sandbox_key(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url, send_sandbox=True, sandbox_write_key=SANDBOX_KEY)
        events = lifecycle(1) + lifecycle(2, environment="sandbox", prefix="sb")
        ingest_events(db_url, settings, events)
        _relay(db_url, settings).drain_all(timeout=10)
        requests = fake.capture.requests
        assert fake.capture.distinct() == 24
    for request in requests:
        envs = {m["context"]["environment"] for m in request.messages}
        assert envs == ({"sandbox"} if request.write_key == SANDBOX_KEY else {"production"})
    assert {r.write_key for r in requests} == {WRITE_KEY, SANDBOX_KEY}


def test_sandbox_off_sends_no_sandbox_message(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)  # send_sandbox defaults to false
        ingest_events(db_url, settings, lifecycle(1) + lifecycle(2, environment="sandbox", prefix="sb"))
        _relay(db_url, settings).drain_all(timeout=10)
        assert {m["context"]["environment"] for m in fake.capture.messages()} == {"production"}
        assert fake.capture.distinct() == 12


def test_disabled_event_is_never_sent(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url, event_names={"renewal": "", "trial_started": "Trial Started"})
        ingest_events(db_url, settings, lifecycle(1))
        _relay(db_url, settings).drain_all(timeout=10)
        events = [m["event"] for m in fake.capture.messages() if m["type"] == "track"]
    assert "rc_renewal_event" not in events and "Trial Started" in events
    assert len(events) == 4


def test_gzip_destination(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url, gzip=True)
        ingest_events(db_url, settings, lifecycle(1))
        _relay(db_url, settings).drain_all(timeout=10)
        assert fake.capture.distinct() == 12
        assert all(r.headers.get("content-encoding") == "gzip" for r in fake.capture.requests)


def test_oversize_message_is_dead_lettered_unsent(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(1) + lifecycle(2))
        with psycopg.connect(db_url) as conn:
            big = conn.execute(
                "UPDATE outbox SET body = jsonb_set(body, '{0,properties,blob}', to_jsonb(repeat('x', 40000)))"
                " WHERE id = (SELECT min(id) FROM outbox WHERE subscriber = 'user-s000002') RETURNING message_id"
            ).fetchone()
        assert big is not None
        _relay(db_url, settings).drain_all(timeout=10)
        assert not fake.requests_with(big[0])
        assert fake.capture.distinct() == 22
        with psycopg.connect(db_url) as conn:
            dead = conn.execute("SELECT message_id, last_error FROM outbox WHERE status = 'dead'").fetchall()
    assert [d[0] for d in dead] == [big[0]] and "32 KB" in dead[0][1]


def test_requests_respect_segment_limits(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, [e for n in range(1500) for e in lifecycle(n, renewals=0)])
        relay = Relay(db_url, routes_for(settings), RelayConfig(batch_rows=3000))
        relay.drain_all(timeout=60)
        relay.close()
        assert fake.capture.distinct() == 1500 * 4 * 2
        sizes = [(len(r.raw), len(r.messages)) for r in fake.capture.requests]
    assert max(s for s, _ in sizes) <= 500_000
    assert max(n for _, n in sizes) <= 2_500
    assert len(sizes) > 1


def test_stored_payload_is_sent_byte_for_byte_equal(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, lifecycle(7))
        with psycopg.connect(db_url) as conn:
            stored = {row[0]: row[1] for row in conn.execute("SELECT message_id, body FROM outbox")}
        _relay(db_url, settings).drain_all(timeout=10)
        received = {m["messageId"]: m for m in fake.capture.messages()}
    for message_id, body in stored.items():
        assert received[message_id] == body[0]
        assert json.dumps(received[body[1]["messageId"]], sort_keys=True) == json.dumps(body[1], sort_keys=True)
    assert all(r.path == "/v1/batch" for r in fake.capture.requests)
    assert APP
