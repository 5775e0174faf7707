"""The scheduler: NOTIFY wake-ups, the poll fallback, a checked listener, inferred expirations, clean stop."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fake_segment import APP, FakeSegment, lifecycle, routes_for, settings_for

from subledger.core.delivery import Backoff
from subledger.core.events import Store, parse_event
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.outbox.relay import Relay, RelayConfig
from subledger.outbox.sink import Reply
from subledger.scheduler.service import Scheduler, SchedulerConfig, grace_by_app, infer_expirations


def _policy(settings: Any) -> IngestPolicy:
    return IngestPolicy(destinations=settings.destinations("test"), horizon=settings.historical_horizon)


def _scheduler(db_url: str, settings: Any, **config: Any) -> Scheduler:
    relay = Relay(db_url, routes_for(settings), RelayConfig(backoff=Backoff(0.01, 0.05)))
    return Scheduler(db_url, relay, policy=_policy(settings), grace=grace_by_app(settings.apps),
                     config=SchedulerConfig(expirations=False, **config))


def _ingest_one(db_url: str, settings: Any, event: dict[str, Any], *, notify: bool = True) -> float:
    with psycopg.connect(db_url) as conn:
        ingest(conn, [Incoming(Notification.of(parse_event(event)), b"{}")], _policy(settings),
               datetime.now(UTC), notify=notify)
    return time.monotonic()


def _wait(predicate: Any, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.005)
    return None


def test_notify_wakes_the_relay_at_once(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        scheduler = _scheduler(db_url, settings, relay_interval=60, listener_check=60).start()
        try:
            assert _wait(lambda: scheduler.listener_healthy, 5)
            time.sleep(0.2)  # let the start-up pass finish
            latencies = []
            for n, event in enumerate(lifecycle(1)[:3]):
                committed = _ingest_one(db_url, settings, event)
                arrived = _wait(lambda n=n: fake.capture.distinct() >= 2 * (n + 1), 3)
                assert arrived is not None, "NOTIFY did not wake the relay"
                latencies.append(arrived - committed)
        finally:
            scheduler.stop()
    assert max(latencies) < 1.0  # the interval is 60 s: only the wake-up explains this


def test_a_lost_notify_only_delays(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        scheduler = _scheduler(db_url, settings, relay_interval=60, listener_check=0.5).start()
        try:
            assert _wait(lambda: scheduler.listener_healthy, 5)
            _ingest_one(db_url, settings, lifecycle(1)[0], notify=False)
            assert _wait(lambda: fake.capture.distinct() == 2, 5) is not None
        finally:
            scheduler.stop()


def test_the_listener_reconnects_after_losing_its_connection(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        scheduler = _scheduler(db_url, settings, relay_interval=60, listener_check=0.3).start()
        try:
            assert _wait(lambda: scheduler.listener_healthy and scheduler._listen_conn is not None, 5)
            conn = scheduler._listen_conn
            assert conn is not None
            pid = conn.info.backend_pid
            with psycopg.connect(db_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert _wait(lambda: scheduler.listener_reconnects >= 1 and scheduler.listener_healthy, 10)
            assert scheduler._listen_conn is not None and scheduler._listen_conn.info.backend_pid != pid
            _ingest_one(db_url, settings, lifecycle(2)[0])
            assert _wait(lambda: fake.capture.distinct() == 2, 3) is not None
        finally:
            scheduler.stop()


def test_stop_lets_the_running_pass_record_its_outcome(db_url: str) -> None:
    with FakeSegment() as fake:
        fake.then(*[Reply(200, delay=0.6)] * 3)
        settings = settings_for(fake.url)
        for n in range(3):
            _ingest_one(db_url, settings, lifecycle(n)[0])
        scheduler = _scheduler(db_url, settings, relay_interval=60, listener_check=60).start()
        assert _wait(lambda: len(fake.seen_requests) >= 1, 5)
        scheduler.stop()
    with psycopg.connect(db_url) as conn:
        leased = conn.execute("SELECT count(*) FROM outbox WHERE lease_owner IS NOT NULL").fetchone()
        attempts = conn.execute("SELECT count(*) FROM outbox_attempts").fetchone()
    assert leased == (0,)  # nothing left half-marked
    assert attempts is not None and attempts[0] >= 1


def test_inferred_expiration_after_the_grace(db_url: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        hourly = settings.model_copy(update={"apps": {APP: settings.apps[APP].model_copy(
            update={"expiration_grace_hours": 1.0})}})
        purchase = {
            "id": "p1", "app_id": APP, "type": "purchase", "occurred_at": (now - timedelta(days=2)).isoformat(),
            "subscription_id": "exp1", "app_user_id": "u-exp", "store": "app_store", "product_id": "monthly",
            "price": "4.99", "currency": "USD", "expires_at": (now - timedelta(hours=3)).isoformat(),
        }
        _ingest_one(db_url, settings, purchase)
        policy = _policy(settings)
        assert infer_expirations(db_url, policy, grace_by_app(settings.apps), now) == 0  # 24 h grace: not yet
        assert infer_expirations(db_url, policy, grace_by_app(hourly.apps), now) == 1
        assert infer_expirations(db_url, policy, grace_by_app(hourly.apps), now + timedelta(minutes=1)) == 0
        with psycopg.connect(db_url) as conn:
            kinds = [r[0] for r in conn.execute("SELECT kind FROM transitions ORDER BY occurred_at")]
            status = conn.execute("SELECT status FROM subscriptions").fetchone()
            logged = conn.execute("SELECT source, raw FROM event_log WHERE source = 'scheduler'").fetchall()
        assert kinds == ["initial_purchase", "expiration"]
        assert status == ("expired",)
        assert len(logged) == 1 and b'"type":"expiration"' in bytes(logged[0][1])
        relay = Relay(db_url, routes_for(settings))
        relay.drain_all(timeout=10)
        relay.close()
        events = [m.get("event") for m in fake.capture.messages() if m["type"] == "track"]
    assert events == ["rc_initial_purchase_event", "rc_expiration_event"]


def test_an_expiration_inferred_for_old_history_is_history(db_url: str) -> None:
    """Imported history whose period ended weeks ago: the inferred expiration updates state, sends nothing."""
    now = datetime.now(UTC).replace(microsecond=0)
    settings = settings_for("http://127.0.0.1:9", publish_historical=False)
    old = {
        "id": "p-old", "app_id": APP, "type": "purchase", "occurred_at": (now - timedelta(days=40)).isoformat(),
        "subscription_id": "old1", "app_user_id": "u-old", "store": "app_store", "product_id": "monthly",
        "price": "4.99", "currency": "USD", "expires_at": (now - timedelta(days=10)).isoformat(),
    }
    recent = {**old, "id": "p-new", "subscription_id": "new1", "app_user_id": "u-new",
              "occurred_at": (now - timedelta(days=2)).isoformat(),
              "expires_at": (now - timedelta(hours=30)).isoformat()}
    _ingest_one(db_url, settings, old)
    _ingest_one(db_url, settings, recent)
    assert infer_expirations(db_url, _policy(settings), grace_by_app(settings.apps), now) == 2
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT split_part(t.subscription_key, '/', 3), t.historical,"
            " (SELECT count(*) FROM outbox o WHERE o.transition_id = t.id)"
            " FROM transitions t WHERE t.kind = 'expiration' ORDER BY 1"
        ).fetchall()
        statuses = dict(conn.execute("SELECT split_part(key, '/', 3), status FROM subscriptions").fetchall())
    # the period that ended 10 days ago (before the 72 h horizon) follows the historical rule; 30 h ago is news
    assert rows == [("new1", False, 1), ("old1", True, 0)]
    assert statuses == {"new1": "expired", "old1": "expired"}


def test_inferred_expiration_id_names_the_period_end() -> None:
    """The README's id form: `expire:<period end>:<digest of subscription and period end>`."""
    from subledger.core.lifecycle import SubscriptionState, inferred_expiration

    end = datetime(2026, 1, 31, 12, tzinfo=UTC)
    state = SubscriptionState(key="app/app_store/s1", app_id="app", store=Store.APP_STORE, subscription_id="s1",
                              started=True, expires_at=end)
    event = inferred_expiration(state, end + timedelta(hours=25), timedelta(hours=24))
    assert event is not None and event.occurred_at == end
    digest = hashlib.sha256(b"app/app_store/s1\x1f2026-01-31T12:00:00.000000Z").hexdigest()[:32]
    assert event.id == f"expire:2026-01-31T12:00:00.000000Z:{digest}"
    assert inferred_expiration(state, end + timedelta(hours=23), timedelta(hours=24)) is None


def test_expiration_job_runs_in_the_scheduler(db_url: str) -> None:
    now = datetime.now(UTC)
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        purchase = {
            "id": "p2", "app_id": APP, "type": "purchase", "occurred_at": (now - timedelta(days=2)).isoformat(),
            "subscription_id": "exp2", "app_user_id": "u-exp2", "store": "app_store", "product_id": "monthly",
            "price": "4.99", "currency": "USD", "expires_at": (now - timedelta(hours=30)).isoformat(),
        }
        _ingest_one(db_url, settings, purchase)
        relay = Relay(db_url, routes_for(settings), RelayConfig(backoff=Backoff(0.01, 0.05)))
        scheduler = Scheduler(db_url, relay, policy=_policy(settings), grace=grace_by_app(settings.apps),
                              config=SchedulerConfig(relay_interval=0.2, expiration_interval=0.2)).start()
        try:
            arrived = _wait(lambda: any(m.get("event") == "rc_expiration_event" for m in fake.capture.messages()), 10)
        finally:
            scheduler.stop()
        assert arrived is not None


def test_the_relay_reconnects_after_losing_its_database_connection(db_url: str) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        scheduler = _scheduler(db_url, settings, relay_interval=0.2, listener_check=60).start()
        try:
            _ingest_one(db_url, settings, lifecycle(1)[0])
            assert _wait(lambda: fake.capture.distinct() == 2, 5) is not None
            conn = scheduler.relay._conn
            assert conn is not None
            with psycopg.connect(db_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            _ingest_one(db_url, settings, lifecycle(2)[0])
            assert _wait(lambda: fake.capture.distinct() == 4, 5) is not None
        finally:
            scheduler.stop()
