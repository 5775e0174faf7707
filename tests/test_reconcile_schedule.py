"""Reconciliation as an operator runs it: scheduled jobs inside the relay process recover dropped webhooks
with no CLI call, no credentials means no job, a run the API stops leaves its cursor, `/readyz` is
degraded by a gap above the threshold, and `subledger reconcile status` tells it all."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fake_stripe_api import API_KEY, FakeStripe
from test_reconcile_stripe import DROPPED, EXPECTED, _incoming, lifecycle, names, push, settings_for
from typer.testing import CliRunner
from webhooks_support import STRIPE_APP, Pipeline, write_root

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.cli import app as cli
from subledger.app.reconcile_schedule import RECONCILERS, scheduled_jobs, scheduled_run
from subledger.app.settings import ReconciliationSettings, Settings
from subledger.app.sources import build_sources
from subledger.app.worker import build_relay, build_scheduler
from subledger.outbox.ingest import ingest
from subledger.store import reconciliation

STRIPE = RECONCILERS["stripe"]
FAST = ReconciliationSettings(frequent_minutes=0.02, first_run_delay_seconds=0)  # a tick every 1.2 s


def with_reconciliation(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"reconciliation": FAST.model_copy(update=changes)})


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    """The HTTP service over a test database; its Stripe app reads a fake Stripe whose failed set is DROPPED."""
    from fake_segment import FakeSegment
    from fastapi.testclient import TestClient

    from subledger.app.http import create_app

    events = lifecycle(datetime.now(UTC))
    with FakeSegment() as segment, FakeStripe(events, set(DROPPED), page_size=1, throttle=0) as stripe:
        settings = with_reconciliation(settings_for(segment.url, stripe.url, write_root(tmp_path)))
        with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
            pipeline = Pipeline(client, segment, settings, db_url)
            pipeline.stripe = stripe  # type: ignore[attr-defined]
            pipeline.events = events  # type: ignore[attr-defined]
            yield pipeline


def test_the_relay_process_recovers_dropped_webhooks_on_its_own(world: Pipeline) -> None:
    p = world
    push(p, p.events, skip=DROPPED)  # type: ignore[attr-defined]
    services = build(p.settings, database_url=p.db_url)
    scheduler = build_scheduler(services, build_relay(services), interval=0.2, expirations=False)
    assert sorted(j.id for j in scheduler.jobs) == [f"reconcile stripe/all {STRIPE_APP}",
                                                    f"reconcile stripe/failures {STRIPE_APP}"]
    scheduler.start()
    try:
        job = scheduler._scheduler.get_job(f"reconcile stripe/failures {STRIPE_APP}")
        # never overlapping itself, missed ticks coalesced, on threads apart from the relay's
        assert (job.max_instances, job.coalesce, job.executor, job.misfire_grace_time) == (1, True, "wired", None)
        assert _wait(lambda: names(p.fake.capture.messages()) == EXPECTED, 20), names(p.fake.capture.messages())
        with psycopg.connect(p.db_url) as conn:  # both modes completed: each has its cursor
            assert _wait(lambda: {c.name for c in reconciliation.cursors(conn)} == {"stripe/failures",
                                                                                    "stripe/all"}, 10)
        time.sleep(1.5)  # another frequent tick: nothing more is recovered or sent
    finally:
        scheduler.stop()
    assert p.fake.capture.duplicates() == {}
    assert names(p.fake.capture.messages()) == EXPECTED
    with psycopg.connect(p.db_url) as conn:
        assert reconciliation.recovered_counts(conn) == {(STRIPE_APP, "stripe"): 2}
    queries = p.stripe.requests  # type: ignore[attr-defined]
    assert any(q.get("delivery_success") == ["false"] for q in queries)  # the frequent run: failures only
    assert any("delivery_success" not in q for q in queries)  # the daily run: every type
    ready = p.client.get("/readyz").json()
    assert ready["status"] == "degraded"
    assert ready["reconciliation_gaps"] == [{"app_id": STRIPE_APP, "source": "stripe", "recovered_last_24h": 2}]


def test_no_credentials_no_job(world: Pipeline) -> None:
    settings = world.settings
    assert len(scheduled_jobs(build(settings, database_url=world.db_url))) == 2  # failures and all, one app
    stripe = settings.apps[STRIPE_APP].stripe
    assert stripe is not None
    no_key = settings.apps[STRIPE_APP].model_copy(update={"stripe": stripe.model_copy(update={"api_key": None})})
    keyless = settings.model_copy(update={"apps": {**settings.apps, STRIPE_APP: no_key}})
    services = build(keyless, database_url=world.db_url)
    assert scheduled_jobs(services) == []
    keyless_scheduler = build_scheduler(services, build_relay(services))
    assert keyless_scheduler.jobs == ()
    keyless_scheduler.stop()
    off = with_reconciliation(settings, enabled=False)
    assert scheduled_jobs(build(off, database_url=world.db_url)) == []
    told_not_to = build_scheduler(build(settings, database_url=world.db_url), build_relay(services),
                                  reconciliation=False)
    assert told_not_to.jobs == ()
    told_not_to.stop()


def test_a_run_stopped_by_429s_leaves_its_cursor_and_the_next_run_resumes(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    now = datetime.now(UTC).replace(microsecond=0)
    events = lifecycle(now)
    root = write_root(tmp_path)
    with FakeStripe(events[:2], set(), throttle=0) as stripe:
        settings = with_reconciliation(settings_for("http://127.0.0.1:9", stripe.url, root))
        services = build(settings, database_url=db_url, clock=lambda: now - timedelta(hours=1))
        sources = build_sources(settings)
        first = scheduled_run(services, sources, STRIPE, STRIPE_APP, False, threading.Event())
        assert first is not None and first.listed == 0
    with psycopg.connect(db_url) as conn:
        before = reconciliation.cursor_of(conn, "stripe/failures", STRIPE_APP)
    assert before is not None and before.read_until == now - timedelta(hours=1)

    with FakeStripe(events, set(DROPPED), throttle=10**9) as stripe:  # 429 forever
        settings = with_reconciliation(settings_for("http://127.0.0.1:9", stripe.url, root))
        services = build(settings, database_url=db_url, clock=lambda: now)
        with caplog.at_level(logging.WARNING, logger="subledger.reconcile"):
            assert scheduled_run(services, build_sources(settings), STRIPE, STRIPE_APP, False,
                                 threading.Event()) is None
        assert len(stripe.requests) == 6  # the first try and the client's five retries, then the run stopped
    assert any("reconcile stripe/failures for app" in r.getMessage() and "next run retries" in r.getMessage()
               for r in caplog.records)
    with psycopg.connect(db_url) as conn:
        assert reconciliation.cursor_of(conn, "stripe/failures", STRIPE_APP) == before
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (0,)

    with FakeStripe(events, set(DROPPED), throttle=0) as stripe:  # the API answers again: the next run resumes
        settings = with_reconciliation(settings_for("http://127.0.0.1:9", stripe.url, root))
        services = build(settings, database_url=db_url, clock=lambda: now)
        resumed = scheduled_run(services, build_sources(settings), STRIPE, STRIPE_APP, False, threading.Event())
        assert resumed is not None and resumed.recovered == 2
        # from the same cursor (less Stripe's 3-day overlap), not from the failed run's time
        assert stripe.requests[0]["created[gte]"] == [str(int((before.read_until - timedelta(days=3)).timestamp()))]
    with psycopg.connect(db_url) as conn:
        after = reconciliation.cursor_of(conn, "stripe/failures", STRIPE_APP)
        assert after is not None and after.read_until == now


def test_the_daily_run_is_due_once_a_day(db_url: str, tmp_path: Path) -> None:
    import threading

    now = datetime.now(UTC).replace(microsecond=0)
    with FakeStripe(lifecycle(now), set(), throttle=0) as stripe:
        settings = with_reconciliation(settings_for("http://127.0.0.1:9", stripe.url, write_root(tmp_path)),
                                       frequent_minutes=15)
        sources = build_sources(settings)

        def tick(at: datetime) -> Any:
            services = build(settings, database_url=db_url, clock=lambda: at)
            return scheduled_run(services, sources, STRIPE, STRIPE_APP, True, threading.Event())

        assert tick(now) is not None  # never run: due
        assert tick(now + timedelta(minutes=15)) is None  # a tick later: not due
        assert tick(now + timedelta(hours=23, minutes=55)) is not None  # a day less under half a tick: due
        runs = [q for q in stripe.requests if "starting_after" not in q]  # each run's first page
        assert len(runs) == 2 and all("delivery_success" not in q for q in runs)


# -- the gap report -------------------------------------------------------------------------------

def _recover(db_url: str, at: datetime, count: int) -> None:
    from test_reconcile_stripe import POLICY

    with psycopg.connect(db_url) as conn:
        ingest(conn, [_incoming(f"r{n}", timedelta(hours=1), at, "reconciliation") for n in range(count)]
               + [_incoming("p", timedelta(hours=1), at, "push")], POLICY, at)


def test_readyz_is_degraded_above_the_gap_threshold(db_url: str) -> None:
    from fastapi.testclient import TestClient

    from subledger.app.http import create_app

    now = datetime.now(UTC)
    _recover(db_url, now - timedelta(hours=2), 2)

    def ready(threshold: int, at: datetime) -> dict[str, Any]:
        settings = settings_module.from_dict({"reconciliation": {"gap_threshold": threshold}})
        with TestClient(create_app(build(settings, database_url=db_url, clock=lambda: at), pool_size=1)) as client:
            response = client.get("/readyz")
            assert response.status_code == 200
            body: dict[str, Any] = response.json()
            return body

    degraded = ready(1, now)
    assert degraded["status"] == "degraded"
    assert degraded["reconciliation_gaps"] == [{"app_id": "com.example", "source": "custom",
                                                "recovered_last_24h": 2}]
    assert (ready(2, now)["status"], ready(2, now)["reconciliation_gaps"]) == ("ok", [])  # not more than 2
    later = ready(0, now + timedelta(hours=22, minutes=1))  # received 24 h before: out of the window
    assert (later["status"], later["reconciliation_gaps"]) == ("ok", [])


def test_the_recent_count_reads_the_partial_index_not_the_log(db_url: str) -> None:
    now = datetime.now(UTC)
    _recover(db_url, now, 3)
    with psycopg.connect(db_url) as conn:
        assert reconciliation.recovered_since(conn, now - reconciliation.GAP_WINDOW) == {("com.example",
                                                                                          "custom"): 3}
        assert reconciliation.recovered_since(conn, now + timedelta(seconds=1)) == {}
        conn.execute("SET enable_seqscan = off")  # a plan may still seq scan, when no index can serve
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + reconciliation.RECOVERED_SINCE_SQL,
                                                    (reconciliation.RECONCILIATION, now)).fetchall())
    assert "Seq Scan on event_log" not in plan, plan
    assert "event_log_not_pushed" in plan, plan


# -- reconcile status -----------------------------------------------------------------------------

def test_reconcile_status_tells_configured_cursors_and_the_gap(world: Pipeline, tmp_path: Path) -> None:
    p = world
    push(p, p.events, skip=DROPPED)  # type: ignore[attr-defined]
    stripe = p.settings.apps[STRIPE_APP].stripe
    assert stripe is not None
    config = tmp_path / "subledger.toml"
    config.write_text(
        f'[reconciliation]\ngap_threshold = 1\n\n'
        f'[apps."{STRIPE_APP}".stripe]\nendpoint_secrets = {json.dumps(stripe.endpoint_secrets)}\n'
        f'api_key = "{API_KEY}"\napi_base_url = "{p.stripe.url}"\n\n'  # type: ignore[attr-defined]
        f'[apps."com.example.keyless".stripe]\nendpoint_secrets = ["whsec_x"]\n'
    )
    runner = CliRunner()
    base = ["--config", str(config), "--database-url", p.db_url]
    before = runner.invoke(cli, ["reconcile", "status", "--json", *base])
    assert before.exit_code == 0, before.output
    body = json.loads(before.stdout)
    assert (body["gap_threshold"], body["enabled"], body["gap_window_hours"]) == (1, True, 24)
    assert [(s["source"], s["app_id"], s["configured"], s["cursors"], s["gap"]) for s in body["stores"]] == [
        ("stripe", STRIPE_APP, True, [], False), ("stripe", "com.example.keyless", False, [], False)]

    ran = runner.invoke(cli, ["reconcile", "stripe", "--json", *base])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["recovered"] == 2

    after = runner.invoke(cli, ["reconcile", "status", "--json", *base])
    assert after.exit_code == 0, after.output
    mine = next(s for s in json.loads(after.stdout)["stores"] if s["app_id"] == STRIPE_APP)
    assert (mine["configured"], mine["scheduled"], mine["recovered_last_24h"], mine["recovered_total"],
            mine["gap"]) == (True, True, 2, 2, True)
    assert [c["mode"] for c in mine["cursors"]] == ["failures"]
    assert set(mine["cursors"][0]) == {"mode", "read_until", "updated_at"}

    text = runner.invoke(cli, ["reconcile", "status", *base])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert "a gap is more than 1 fact recovered in 24 h" in lines[0]
    assert f"stripe {STRIPE_APP}: configured, scheduled; recovered 2 in the last 24 h (a gap: more than 1), " \
           "2 in all" in lines
    assert any(line.startswith("  failures: read until ") for line in lines)
    assert "stripe com.example.keyless: not configured (no API credentials); recovered 0 in the last 24 h, " \
           "0 in all" in lines


# -- every store in the registry ----------------------------------------------------------------

def test_apple_and_google_apps_with_credentials_get_their_jobs(db_url: str, tmp_path: Path) -> None:
    from test_e2e_google import GOOGLE_APP, google_config
    from webhooks_support import APPLE_APP

    config = google_config(write_root(tmp_path), "http://127.0.0.1:9", "http://127.0.0.1:9")
    config["apps"][APPLE_APP]["apple"].update(api_key="${APPLE_KEY}", key_id="KEY1", issuer_id="issuer")
    config["apps"][STRIPE_APP]["stripe"]["api_key"] = API_KEY
    with pytest.MonkeyPatch.context() as env:
        env.setenv("APPLE_KEY", "-----BEGIN PRIVATE KEY-----")  # only opened when a job runs
        services = build(settings_module.from_dict(config), database_url=db_url)
    ids = sorted(j.id for j in scheduled_jobs(services))
    assert ids == sorted(f"reconcile {store}/{mode} {app}" for store, app in (
        ("apple", APPLE_APP), ("google", GOOGLE_APP), ("stripe", STRIPE_APP)) for mode in ("failures", "all"))
    assert {j.interval for j in scheduled_jobs(services)} == {15 * 60}  # the default frequent_minutes


def test_a_store_with_cursors_of_its_own_is_marked_so_its_daily_run_is_due_once(db_url: str, tmp_path: Path) -> None:
    """Google keeps `google/voided` and `google/sweep`: the runner marks `google/all` after a daily run."""
    import threading

    from fake_google import FakeGoogle
    from test_e2e_google import GOOGLE_APP, google_config

    now = datetime.now(UTC).replace(microsecond=0)
    with FakeGoogle() as google:
        settings = with_reconciliation(settings_module.from_dict(
            google_config(write_root(tmp_path), "http://127.0.0.1:9", google.url)), frequent_minutes=15)
        sources = build_sources(settings)

        def tick(at: datetime) -> Any:
            services = build(settings, database_url=db_url, clock=lambda: at)
            return scheduled_run(services, sources, RECONCILERS["google"], GOOGLE_APP, True, threading.Event())

        assert tick(now) is not None
        assert tick(now + timedelta(minutes=15)) is None
    with psycopg.connect(db_url) as conn:
        assert {c.name: c.updated_at for c in reconciliation.cursors(conn)} == {
            "google/all": now, "google/voided": now, "google/sweep": now}


def test_the_cli_bar_counts_pages_and_leaves_the_output_as_it_was(
    world: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from subledger.app.cli import reconcile as reconcile_cli
    from subledger.app.reconcile_schedule import pages_read, run

    p = world
    push(p, p.events, skip=DROPPED)  # type: ignore[attr-defined]
    services = build(p.settings, database_url=p.db_url)
    seen: list[Any] = []
    with psycopg.connect(p.db_url) as conn:
        summary = run(services, conn, STRIPE, STRIPE_APP, dry_run=True, sleep=lambda _: None, watch=seen.append)
    assert summary is not None and summary.pages == 2 and pages_read(seen[0]) == 2  # what the bar shows

    monkeypatch.setattr(reconcile_cli, "sys", SimpleNamespace(stderr=SimpleNamespace(isatty=lambda: True)))
    config = tmp_path / "subledger.toml"
    stripe = p.settings.apps[STRIPE_APP].stripe
    assert stripe is not None
    config.write_text(f'[apps."{STRIPE_APP}".stripe]\nendpoint_secrets = {json.dumps(stripe.endpoint_secrets)}\n'
                      f'api_key = "{API_KEY}"\napi_base_url = "{p.stripe.url}"\n')  # type: ignore[attr-defined]
    result = CliRunner().invoke(cli, ["reconcile", "stripe", "--config", str(config), "--database-url", p.db_url])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"stripe {STRIPE_APP}: recovered 2 events, 0 already logged, 0 refused; "
                                          "2 pages, 2 API calls"]


def test_a_run_already_going_elsewhere_is_not_run_twice(world: Pipeline, tmp_path: Path) -> None:
    """serve and relay side by side: the second process to reach a tick skips it; the CLI says so (exit 1)."""
    import threading

    p = world
    config = tmp_path / "subledger.toml"
    stripe = p.settings.apps[STRIPE_APP].stripe
    assert stripe is not None
    config.write_text(f'[apps."{STRIPE_APP}".stripe]\nendpoint_secrets = {json.dumps(stripe.endpoint_secrets)}\n'
                      f'api_key = "{API_KEY}"\napi_base_url = "{p.stripe.url}"\n')  # type: ignore[attr-defined]
    services = build(p.settings, database_url=p.db_url)
    with psycopg.connect(p.db_url) as holder:
        assert reconciliation.try_lock(holder, "stripe/failures", STRIPE_APP)
        assert scheduled_run(services, build_sources(p.settings), STRIPE, STRIPE_APP, False, threading.Event()) is None
        busy = CliRunner().invoke(cli, ["reconcile", "stripe", "--config", str(config), "--database-url", p.db_url])
        assert busy.exit_code == 1 and "in progress" in busy.stderr, busy.output
        daily = scheduled_run(services, build_sources(p.settings), STRIPE, STRIPE_APP, True, threading.Event())
        assert daily is not None  # the other mode has a lock of its own
        reconciliation.unlock(holder, "stripe/failures", STRIPE_APP)
    assert p.stripe.requests and all("delivery_success" not in q for q in p.stripe.requests)  # type: ignore[attr-defined]
    again = CliRunner().invoke(cli, ["reconcile", "stripe", "--config", str(config), "--database-url", p.db_url])
    assert again.exit_code == 0, again.output


def test_the_reconciliation_settings_refuse_what_cannot_be_scheduled() -> None:
    from subledger.core.errors import ConfigError

    defaults = settings_module.from_dict({}).reconciliation
    assert (defaults.enabled, defaults.frequent_minutes, defaults.daily_hours, defaults.gap_threshold) == (
        True, 15, 24, 0)
    for bad, key in (({"frequent_minutes": 0}, "reconciliation.frequent_minutes"),
                     ({"gap_threshold": -1}, "reconciliation.gap_threshold"),
                     ({"frequent_minutes": 120, "daily_hours": 1}, "reconciliation"),
                     ({"weekly": True}, "reconciliation.weekly")):
        with pytest.raises(ConfigError) as refused:
            settings_module.from_dict({"reconciliation": bad})
        assert refused.value.key == key, refused.value
