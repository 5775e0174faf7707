"""Google Play reconciliation end to end: RTDN pushes dropped, voided purchases listed and live-but-ended
subscriptions swept against a fake Google on 127.0.0.1, the lost facts logged (arrival = reconciliation)
with the fetched state beside them, published once, never recovered twice, replayed without Google."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fake_google import PACKAGE, FakeGoogle, order, subscription_v2, voided_purchase
from fastapi.testclient import TestClient
from test_e2e_google import EXPORT_SQL, GOOGLE_APP, MONTHLY, GooglePipeline, google_config
from typer.testing import CliRunner
from webhooks_support import SANDBOX_KEY, WRITE_KEY, write_root

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.cli import app as cli
from subledger.app.google_api import GoogleLinks, PlayApi, split_capture
from subledger.app.http import create_app
from subledger.app.reconcile_google import GoogleSummary, reconcile_google
from subledger.app.sources import build_sources
from subledger.core.errors import SourceUnavailable
from subledger.core.sources.google import GoogleConfig, map_push, parse_push
from subledger.outbox.replay import replay
from subledger.store import reconciliation
from subledger.store.log import facts_of
from subledger.store.verify import verify

DAY, HOUR = timedelta(days=1), timedelta(hours=1)
USERS = {"tok-A": "user_play_a", "tok-B": "user_play_b", "tok-C": "user_play_c", "tok-D": "user_play_d"}
EXPIRED, CANCELED = "SUBSCRIPTION_STATE_EXPIRED", "SUBSCRIPTION_STATE_CANCELED"
# Every push that states a fact of the lifecycle below but A's purchase, B's, C's and D's: A's renewal
# and its refund, B's cancellation and expiry, C's revocation (voided and revoked).
DROPPED = {"A.renew", "A.refund", "B.cancel", "B.expire", "C.refund", "C.revoke"}


@pytest.fixture
def p(db_url: str, tmp_path: Path) -> Iterator[GooglePipeline]:
    from fake_segment import FakeSegment

    with FakeSegment(write_keys=(WRITE_KEY, SANDBOX_KEY)) as segment, FakeGoogle() as google:
        config = google_config(write_root(tmp_path), segment.url, google.url)
        config["apps"][GOOGLE_APP]["destinations"]["segment"]["publish_historical"] = False
        config["api_token"] = "audit-token"
        settings = settings_module.from_dict(config)
        with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
            yield GooglePipeline(client, segment, settings, db_url, google)


def state(p: GooglePipeline, token: str, expiry: datetime, order_id: str, **kw: Any) -> None:
    p.google.subscriptions[token] = subscription_v2(MONTHLY, expiry, order_id=order_id, user=USERS[token], **kw)
    p.google.orders[order_id] = order(order_id, MONTHLY, "9.99")


def lifecycle(p: GooglePipeline, now: datetime, drop: set[str]) -> None:
    """Four subscriptions, Google's state moving between their pushes as it does; `drop`ped pushes are lost.

    A: bought 2 days ago, renewed yesterday, that renewal refunded 6 h ago (no revocation).
    B: bought 68 h ago, cancelled, expired 2 days ago.
    C: bought yesterday, revoked 3 h ago (a chargeback: refund and the end of access).
    D: bought 90 days ago, a period that ended 61 days ago, never heard of since (beyond the sweep).
    Voided purchases list A's refund, C's chargeback and a one-time product's refund.
    """
    def send(name: str, kind: int | None, token: str, at: datetime, **extra: Any) -> None:
        if name not in drop:
            assert p.deliver(kind, token, at, **extra)["result"] == "new"

    state(p, "tok-D", now - 61 * DAY, "GPA.D")
    send("D.buy", 4, "tok-D", now - 90 * DAY)
    state(p, "tok-A", now - DAY, "GPA.A")
    send("A.buy", 4, "tok-A", now - 2 * DAY)
    state(p, "tok-A", now + 29 * DAY, "GPA.A..0")
    send("A.renew", 2, "tok-A", now - DAY)
    send("A.refund", None, "tok-A", now - 6 * HOUR, family="voided", order_id="GPA.A..0")
    state(p, "tok-B", now - 2 * DAY, "GPA.B")
    send("B.buy", 4, "tok-B", now - 2 * DAY - 20 * HOUR)  # inside the 72 h horizon: news
    state(p, "tok-B", now - 2 * DAY, "GPA.B", auto_renew=False, state=CANCELED, canceled="userInitiatedCancellation")
    send("B.cancel", 3, "tok-B", now - 2 * DAY - 6 * HOUR)
    state(p, "tok-B", now - 2 * DAY, "GPA.B", auto_renew=False, state=EXPIRED, canceled="userInitiatedCancellation")
    send("B.expire", 13, "tok-B", now - 2 * DAY)
    state(p, "tok-C", now + 29 * DAY, "GPA.C")
    send("C.buy", 4, "tok-C", now - DAY)
    state(p, "tok-C", now - 3 * HOUR, "GPA.C", auto_renew=False, state=EXPIRED)
    send("C.refund", None, "tok-C", now - 3 * HOUR, family="voided", order_id="GPA.C")
    send("C.revoke", 12, "tok-C", now - 3 * HOUR + timedelta(seconds=1))
    p.google.voided = [
        voided_purchase("tok-A", "GPA.A..0", now - 6 * HOUR),
        voided_purchase("tok-C", "GPA.C", now - 3 * HOUR, source=2, reason=7),
        voided_purchase("tok-OTP", "GPA.OTP", now - 5 * HOUR),  # a one-time product: no subscription to state it on
    ]


def reconcile(p: GooglePipeline, now: datetime, **kw: Any) -> GoogleSummary:
    services = build(p.settings, database_url=p.db_url)
    google = p.settings.apps[GOOGLE_APP].google
    assert google is not None
    api = PlayApi(GOOGLE_APP, google, sleep=lambda _: None)
    try:
        with psycopg.connect(p.db_url) as conn:
            return reconcile_google(conn, build_sources(p.settings), api, GOOGLE_APP, services.policy, now,
                                    pause=0, **kw)
    finally:
        api.close()


def by_user(messages: list[dict[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    """Each user's tracks in the order Segment received them: (event, revenue)."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for m in messages:
        if m["type"] == "track":
            out.setdefault(m["userId"], []).append((m["event"], m["properties"].get("revenue")))
    return out


PUSHED = {
    "user_play_a": [("rc_initial_purchase_event", 9.99)],
    "user_play_b": [("rc_initial_purchase_event", 9.99)],
    "user_play_c": [("rc_initial_purchase_event", 9.99)],
}
EXPECTED = {
    "user_play_a": [("rc_initial_purchase_event", 9.99), ("rc_renewal_event", 9.99),
                    ("rc_cancellation_event", -9.99)],
    "user_play_b": [("rc_initial_purchase_event", 9.99), ("rc_expiration_event", None)],
    "user_play_c": [("rc_initial_purchase_event", 9.99), ("rc_cancellation_event", -9.99),
                    ("rc_expiration_event", None)],
}

# With every push delivered, B's cancellation is told too; the sweep recovers only the state it ends
# in (the expiration), never the switch-off of auto-renew on the way.
DELIVERED = {**EXPECTED, "user_play_b": [("rc_initial_purchase_event", 9.99), ("rc_cancellation_event", None),
                                         ("rc_expiration_event", None)]}


def calls(paths: list[str]) -> Counter[str]:
    """API requests by what they name: the voided list, or the subscription a token or order belongs to."""
    named: Counter[str] = Counter()
    for path in paths:
        if "voidedpurchases" in path:
            named["list"] += 1
            continue
        named[next((t for t in [*USERS, "tok-OTP"] if t in path or f"GPA.{t[-1]}" in path), path)] += 1
    return named


def test_dropped_pushes_are_recovered_published_once_and_never_twice(
    p: GooglePipeline, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    lifecycle(p, now, DROPPED)
    assert by_user(p.relay()) == PUSHED
    before = len(p.google.api_requests())
    p.google.faults.append(429)  # the first call is throttled (PlayApi retries it)
    p.google.voided_page_size = 1
    p.google.voided_fail_once = {2: 503}  # the second page fails once

    with caplog.at_level(logging.WARNING, logger="subledger.reconcile"):
        first = reconcile(p, now).as_json()
    assert (first["recovered"], first["duplicates"], first["listed"], first["skipped"]) == (4, 0, 3, 1)
    assert (first["pages"], first["throttled"], first["swept"], first["unchanged"], first["gone"]) == (3, 1, 2, 0, 0)
    requests = p.google.api_requests()[before:]
    assert first["api_calls"] == len(requests) == 12
    # per subscription: A's refund (subscriptionsv2 + order) and renewal (the same two), B's expiry (the
    # state alone), C's revocation (two); the list's 3 pages + a 429 + a failed page; D (beyond the
    # sweep's 60 days) and the one-time product (no subscription in the log) are never asked about
    assert calls(requests) == {"list": 5, "tok-A": 4, "tok-B": 1, "tok-C": 2}
    assert any("recovered 4 google event(s)" in r.getMessage() for r in caplog.records)
    received = p.relay()
    assert by_user(received) == EXPECTED  # each once (Pipeline.relay asserts no duplicate messageId), in order

    again = reconcile(p, now + HOUR).as_json()
    assert (again["recovered"], again["duplicates"], again["swept"]) == (0, 2, 0)
    assert len(p.relay()) == len(received)

    with psycopg.connect(p.db_url) as conn:
        arrivals = conn.execute("SELECT kind, arrival FROM event_log WHERE arrival = 'reconciliation' "
                                "ORDER BY occurred_at").fetchall()
        assert arrivals == [("SUBSCRIPTION_EXPIRED", "reconciliation"), ("SUBSCRIPTION_RENEWED", "reconciliation"),
                            ("VOIDED_PURCHASE", "reconciliation"), ("SUBSCRIPTION_REVOKED", "reconciliation")]
        assert reconciliation.recovered_counts(conn) == {(GOOGLE_APP, "google"): 4}
        assert reconciliation.cursor(conn, "google/voided", GOOGLE_APP) == now + HOUR
        assert verify(conn).ok
    metrics = p.client.get("/metrics").text
    assert f'subledger_reconciliation_recovered_total{{app_id="{GOOGLE_APP}",source="google"}} 4.0' in metrics


def test_with_every_push_delivered_reconciliation_recovers_nothing(
    p: GooglePipeline, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    lifecycle(p, now, set())
    assert by_user(p.relay()) == DELIVERED
    with caplog.at_level(logging.WARNING, logger="subledger.reconcile"):
        summary = reconcile(p, now, all_types=True).as_json()
    # both subscription refunds are already logged (by their voided push, C's also by its revocation)
    assert (summary["recovered"], summary["duplicates"], summary["swept"], summary["skipped"]) == (0, 2, 0, 1)
    assert not [r for r in caplog.records if "recovered" in r.getMessage()]
    assert by_user(p.relay()) == DELIVERED


def test_the_log_keeps_what_was_fetched_so_replay_and_an_export_never_call_google(p: GooglePipeline) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    lifecycle(p, now, DROPPED)
    reconcile(p, now)
    asked = len(p.google.requests)
    services = build(p.settings, database_url=p.db_url)
    with psycopg.connect(p.db_url) as conn:
        report = replay(conn, services.policy, now)
        assert (report.states, report.transitions, report.messages) == (0, 0, 0)
        rows = conn.execute(EXPORT_SQL.replace("ORDER BY", "AND arrival = 'reconciliation' ORDER BY")).fetchall()
    result = CliRunner().invoke(cli, ["replay", "--database-url", p.db_url])
    assert result.exit_code == 0, result.output
    assert len(p.google.requests) == asked  # replay reads the log, never Google
    # each recovered entry is a push body with the fetched state beside it: it maps again, offline, to
    # exactly the facts logged (what `ingest --format google` of the export does)
    config = GoogleConfig(app_id=GOOGLE_APP, package_name=PACKAGE)
    links = GoogleLinks(None, GOOGLE_APP)
    links.seen.update({t: t for t in USERS})
    assert len(rows) == 4
    for line, facts in rows:
        body, stored = split_capture(line.encode())
        assert stored is not None and stored.subscription is not None
        assert "subledgerReconciliation" in json.loads(body)
        notification = map_push(parse_push(body), stored, config, chain=links)
        assert json.loads(json.dumps(facts_of(notification), default=str)) == facts
    assert len(p.google.requests) == asked


def test_the_sweep_is_bounded_oldest_first_and_a_dry_run_writes_nothing(p: GooglePipeline, tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    lifecycle(p, now, DROPPED)
    p.google.voided = []
    dry = reconcile(p, now, dry_run=True, sweep_limit=1).as_json()
    assert (dry["recovered"], dry["swept"], dry["dry_run"]) == (1, 1, True)  # B ended first
    assert p.google.api_requests()[-1].endswith("/tokens/tok-B")
    with psycopg.connect(p.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log WHERE arrival <> 'push'").fetchone() == (0,)
        assert reconciliation.cursor(conn, "google/voided", GOOGLE_APP) is None

    config = tmp_path / "subledger.toml"
    google = p.settings.apps[GOOGLE_APP].google
    assert google is not None
    config.write_text(f'[apps."{GOOGLE_APP}".google]\naccess_token = "${{PLAY_TEST_TOKEN}}"\n'
                      f'api_base_url = "{p.google.url}"\nbackoff_seconds = 0.01\nsweep_limit = 1\n')
    runner = CliRunner()
    env = {"PLAY_TEST_TOKEN": str(google.access_token)}
    args = ["--config", str(config), "--database-url", p.db_url]
    result = runner.invoke(cli, ["reconcile", "google", "--json", *args], env=env)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["app_id"], body["recovered"], body["swept"], body["mode"]) == (GOOGLE_APP, 1, 1, "recent")
    assert set(body) >= {"listed", "pages", "api_calls", "throttled", "unchanged", "gone", "recovered_ids"}
    line = runner.invoke(cli, ["reconcile", "google", "--app", GOOGLE_APP, "--sweep-limit", "5", *args], env=env)
    assert line.exit_code == 0, line.output
    assert "recovered 1 fact" in line.stdout and "1 subscription swept" in line.stdout  # A; B is expired now
    unknown = runner.invoke(cli, ["reconcile", "google", "--app", "nope", *args], env=env)
    assert unknown.exit_code == 2 and "has no Google Play source" in unknown.stderr
    refused = runner.invoke(cli, ["reconcile", "google", *args], env={"PLAY_TEST_TOKEN": "wrong"})
    assert refused.exit_code == 1 and "answered 401 to voidedpurchases" in refused.stderr
    assert "Traceback" not in refused.output


def test_a_list_google_keeps_failing_stops_the_run_writing_nothing(p: GooglePipeline) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    lifecycle(p, now, DROPPED)
    p.google.faults.extend([503] * 6)  # PlayApi's 3 attempts, twice: past the one resume allowed
    with pytest.raises(SourceUnavailable, match="voidedpurchases"):
        reconcile(p, now, resumes=1)
    with psycopg.connect(p.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log WHERE arrival <> 'push'").fetchone() == (0,)
        assert reconciliation.cursor(conn, "google/voided", GOOGLE_APP) is None
    resumed = reconcile(p, now, resumes=1)  # Google answers again: the next run recovers it all
    assert (resumed.recovered, resumed.resumed) == (4, 0)


def test_the_sweep_query_reads_the_subscriptions_due_index(conn: psycopg.Connection) -> None:
    """No migration: the live-status partial index on expires_at serves the candidates' range, the log
    is reached by primary key (the last folded entry) and by `event_log_subscription` (the token), and
    the refunds already logged by the GIN index of the ids facts name."""
    from subledger.store.play_reconciliation import CANDIDATES_SQL, PROBE

    now = datetime.now(UTC)
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + CANDIDATES_SQL, {
        "app": GOOGLE_APP, "prefix": f"{GOOGLE_APP}/play_store/%", "ended_before": now - HOUR,
        "not_before": now - 60 * DAY, "limit": 500}).fetchall())
    assert "subscriptions_due" in plan, plan
    assert "event_log_subscription" in plan and "event_log_pkey" in plan, plan
    # the refunds already logged: each order's probe is the GIN index's own expression (on a large log
    # these selective probes win over `source = 'google'`, which an empty test table cannot show)
    probes = "SELECT position FROM event_log WHERE " + " OR ".join([PROBE] * 2)
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + probes, ['["GPA.1"]', '["GPA.2"]']).fetchall())
    assert "BitmapOr" in plan and "event_log_references" in plan, plan


def test_a_recovered_chargeback_says_who_voided_it_and_why(p: GooglePipeline) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    lifecycle(p, now, DROPPED)
    reconcile(p, now)
    with psycopg.connect(p.db_url) as conn:
        rows = conn.execute("SELECT kind, facts FROM event_log WHERE arrival = 'reconciliation' ORDER BY occurred_at")
        attributes = {kind: [e["attributes"] for e in facts["events"]] for kind, facts in rows}
    refund, expiry = attributes["SUBSCRIPTION_REVOKED"]
    assert (refund["google_voided_source"], refund["google_voided_reason"]) == ("google", "chargeback")
    assert refund["google_reconciled_from"] == expiry["google_reconciled_from"] == "purchases.voidedpurchases"
    assert attributes["SUBSCRIPTION_RENEWED"][0]["google_reconciled_from"] == "purchases.subscriptionsv2"
    assert attributes["VOIDED_PURCHASE"][0]["google_voided_reason"] == "remorse"
