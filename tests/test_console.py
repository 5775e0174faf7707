"""The web console over HTTP: sign-in, the cookie, CSRF, every page's auth, actions, and query cost."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import psycopg.sql
import pytest
from fake_segment import APP, WRITE_KEY, ingest_events, lifecycle
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.cli import app as cli
from subledger.app.console import auth, pages, signature
from subledger.app.http import create_app
from subledger.core.events import parse_event
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.store import audit, rollups, verify_runs
from subledger.store import console as queries
from subledger.store import outbox as outbox_store

TOKEN = "console-test-token"
NOW = datetime(2026, 10, 1, 12, tzinfo=UTC)


def console_settings(endpoint: str = "http://127.0.0.1:9", **extra: Any) -> settings_module.Settings:
    dest = {"write_key": WRITE_KEY, "endpoint": endpoint, "publish_historical": True, "timeout_seconds": 2.0}
    return settings_module.from_dict({"api_token": TOKEN, "apps": {APP: {"destinations": {"segment": dest}}},
                                      **extra})


def seed(db_url: str, n: int = 3) -> dict[str, str]:
    """`n` subscribers with full lifecycles; the first one's first message is dead."""
    events = [e for i in range(n) for e in lifecycle(i)]
    ingest_events(db_url, console_settings(), events, now=NOW - timedelta(days=1))
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT message_id, subscriber FROM outbox WHERE subscriber = 'user-s000000'"
                           " ORDER BY id LIMIT 1").fetchone()
        assert row is not None
        conn.execute("UPDATE outbox SET status = 'dead', last_error = 'HTTP 400: poison' WHERE message_id = %s",
                     (row[0],))
    return {"dead": row[0], "subscriber": row[1]}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def seeded(db_url: str) -> dict[str, str]:
    return seed(db_url)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(db_url: str, seeded: dict[str, str], clock: Clock) -> Iterator[TestClient]:
    app = create_app(build(console_settings(), database_url=db_url, clock=clock))
    with TestClient(app, follow_redirects=False) as c:
        yield c


def sign_in(client: TestClient, token: str = TOKEN) -> Any:
    page = client.get("/console/login")
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', page.text)
    assert nonce is not None
    return client.post("/console/login", data={"token": token, "login_csrf": nonce.group(1), "next": "/console/dead"})


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


def pages_of(seeded: dict[str, str]) -> list[str]:
    return ["/console", f"/console/subscribers/{seeded['subscriber']}", "/console/search?q=user-s000001",
            "/console/deliveries", "/console/deliveries?status=delivered", f"/console/messages/{seeded['dead']}",
            f"/console/explain/{seeded['dead']}", "/console/dead", "/console/destinations", "/console/entries/1",
            "/console/static/console.css", "/console/static/console.js"]


def test_every_page_redirects_anonymous_requests_to_sign_in_and_accepts_the_bearer_token(
        client: TestClient, seeded: dict[str, str]) -> None:
    for path in pages_of(seeded):
        anonymous = client.get(path)
        assert anonymous.status_code == 303, path
        assert anonymous.headers["location"].startswith("/console/login?next=%2Fconsole"), path
        assert "user-s0" not in anonymous.text and "body{" not in anonymous.text  # nothing leaks
        wrong = client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 303, path
        bearer = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code in (200, 303), (path, bearer.status_code)  # search may jump to its one hit
    for path in ("/console/dead/retry", "/console/destinations/pause", "/console/logout"):
        assert client.post(path, data={"ref": seeded["dead"]}).status_code == 303


def test_sign_in_sets_a_signed_http_only_strict_cookie_that_expires(client: TestClient, clock: Clock) -> None:
    assert sign_in(client, "wrong").status_code == 401
    assert auth.SESSION_COOKIE not in client.cookies
    done = sign_in(client)
    assert done.status_code == 303 and done.headers["location"] == "/console/dead"
    cookie = next(h for h in done.headers.get_list("set-cookie") if h.startswith(auth.SESSION_COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and f"Max-Age={auth.SESSION_SECONDS}" in cookie
    assert "Path=/console" in cookie
    assert client.get("/console").status_code == 200
    value = client.cookies[auth.SESSION_COOKIE]
    forged = value.split(".")
    forged[1] = str(int(forged[1]) + 86400)  # extend the expiry without the key
    client.cookies.set(auth.SESSION_COOKIE, ".".join(forged), path="/console")
    assert client.get("/console").status_code == 303
    client.cookies.set(auth.SESSION_COOKIE, value, path="/console")
    assert client.get("/console").status_code == 200
    clock.now = NOW + timedelta(seconds=auth.SESSION_SECONDS + 1)
    assert client.get("/console").status_code == 303


def test_sign_in_refuses_a_foreign_form_and_an_open_redirect(client: TestClient) -> None:
    client.get("/console/login")
    forged = client.post("/console/login", data={"token": TOKEN, "login_csrf": "guess"})
    assert forged.status_code == 403 and auth.SESSION_COOKIE not in client.cookies
    page = client.get("/console/login?next=//evil.example/x")
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', page.text)
    assert nonce is not None
    done = client.post("/console/login", data={"token": TOKEN, "login_csrf": nonce.group(1),
                                                "next": "//evil.example/x"})
    assert done.headers["location"] == "/console"


def test_a_post_without_its_csrf_token_is_refused(client: TestClient, db_url: str) -> None:
    sign_in(client)
    for path, data in (("/console/destinations/pause", {"app_id": APP, "destination": "segment", "confirm": "yes"}),
                       ("/console/logout", {}),
                       ("/console/dead/retry", {"all": "yes", "confirm": "yes"})):
        refused = client.post(path, data=data)
        assert refused.status_code == 403, path
        other = client.post(path, data={**data, "csrf": "x" * 43})
        assert other.status_code == 403, path
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM destination_state WHERE paused").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM outbox WHERE status = 'dead'").fetchone() == (1,)
    assert client.get("/console").status_code == 200  # still signed in


def test_pause_and_resume_are_confirmed_then_done_and_flashed(client: TestClient, db_url: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    sign_in(client)
    csrf = csrf_of(client.get("/console/destinations").text)
    form = {"csrf": csrf, "app_id": APP, "destination": "segment"}
    asked = client.post("/console/destinations/pause", data=form)
    assert asked.status_code == 200 and "Pause com.test.app / segment?" in asked.text
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM destination_state WHERE paused").fetchone() == (0,)
    with caplog.at_level("INFO", logger="subledger.console"):
        done = client.post("/console/destinations/pause", data={**form, "confirm": "yes"})
    assert done.status_code == 303 and done.headers["location"] == "/console/destinations"
    assert any("paused com.test.app/segment" in r.getMessage() and "console session" in r.getMessage()
               for r in caplog.records)
    page = client.get("/console/destinations")
    assert "paused com.test.app / segment" in page.text and "Resume" in page.text
    assert "paused com.test.app / segment" not in client.get("/console/destinations").text  # one-shot flash
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT paused FROM destination_state WHERE destination = 'segment'").fetchone() == (
            True,)
    client.post("/console/destinations/resume", data={**form, "confirm": "yes"})
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT paused FROM destination_state WHERE destination = 'segment'").fetchone() == (
            False,)
    unknown = client.post("/console/destinations/pause", data={**form, "destination": "nope", "confirm": "yes"})
    assert unknown.status_code == 404 and "has no destination 'nope'" in html.unescape(unknown.text)


def test_retry_a_dead_letter_from_the_console(client: TestClient, db_url: str, seeded: dict[str, str]) -> None:
    sign_in(client)
    page = client.get("/console/dead")
    assert seeded["dead"] in page.text and "HTTP 400: poison" in page.text
    form = {"csrf": csrf_of(page.text), "ref": seeded["dead"], "back": "/console/dead"}
    asked = client.post("/console/dead/retry", data=form)
    assert asked.status_code == 200 and "Retry " + seeded["dead"] in asked.text
    done = client.post("/console/dead/retry", data={**form, "confirm": "yes"})
    assert done.status_code == 303
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT status FROM outbox WHERE message_id = %s", (seeded["dead"],)).fetchone() == (
            "pending",)
    assert "requeued 1 message" in client.get("/console/dead").text


def test_bearer_clients_need_no_csrf_token(client: TestClient, db_url: str, seeded: dict[str, str]) -> None:
    done = client.post("/console/dead/retry", data={"all": "yes", "confirm": "yes"},
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.status_code == 303
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox WHERE status = 'dead'").fetchone() == (0,)


def test_subscriber_page_tells_the_story(client: TestClient, seeded: dict[str, str]) -> None:
    sign_in(client)
    page = client.get(f"/console/subscribers/{seeded['subscriber']}")
    assert page.status_code == 200
    for text in ("trial_started", "rc_trial_started_event", "com.test.app/app_store/s000000", seeded["dead"],
                 "Log entries", "State at", "expired", 'datetime="2026-09-01T00:00:00.000000Z"'):
        assert text in page.text, text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    past = client.get(f"/console/subscribers/{seeded['subscriber']}?at=2026-09-02T00:00")
    assert "status-trial\"" in past.text and 'value="2026-09-02T00:00:00"' in past.text
    assert client.get("/console/subscribers/nobody").status_code == 404
    assert client.get(f"/console/subscribers/{seeded['subscriber']}?at=yesterday").status_code == 400


def test_search_deep_links_each_kind_of_name(client: TestClient, seeded: dict[str, str]) -> None:
    sign_in(client)
    for q, target in (("user-s000001", "/console/subscribers/user-s000001"),
                      ("s000002", f"/console/subscribers/{APP}/app_store/s000002"),
                      (seeded["dead"], f"/console/messages/{seeded['dead']}"),
                      ("s000001-3", "/console/entries/")):
        found = client.get("/console/search", params={"q": q})
        assert found.status_code == 303 and found.headers["location"].startswith(target), q
    assert "Nothing matches" in client.get("/console/search?q=zzz").text
    assert client.get("/console/search?q=a%00b").status_code == 400


def test_message_explain_entry_and_overview_pages(client: TestClient, seeded: dict[str, str]) -> None:
    sign_in(client)
    message = client.get(f"/console/messages/{seeded['dead']}")
    assert "rc_trial_started_event" in message.text and "POST http://127.0.0.1:9/v1/batch" in message.text
    assert "Retry" in message.text
    chain = client.get(f"/console/explain/{seeded['dead']}")
    for step in ("1. Notification", "2. Log entry", "3. Transition", "4. Messages", "5. Attempts", "s000000-0"):
        assert step in chain.text, step
    entry = client.get("/console/entries/1")
    assert "Raw payload" in entry.text and "s000000-0" in entry.text
    overview = client.get("/console")
    assert "<svg" in overview.text and "trial_started" in overview.text and "com.test.app" in overview.text
    backlog = client.get("/console/destinations").text  # 3 lifecycles x 6 messages, one of them dead
    assert '<td class="n">17</td>' in backlog and "/console/dead?app_id=com.test.app" in backlog
    assert "1 d 0 h" in backlog  # the oldest pending row was made a day before the service's clock
    feed = client.get("/console/deliveries?status=dead")
    assert seeded["dead"] in feed.text
    assert client.get("/console/deliveries?status=bogus").status_code == 400
    assert client.get("/console/messages/nope").status_code == 404


def _seq_scans(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'event_log'").fetchone()
    return int(row[0]) if row else 0


def _reads(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
    """table → (sequential scans, index scans) so far in this transaction."""
    rows = conn.execute("SELECT relname, seq_scan, coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables").fetchall()
    return {str(name): (int(seq), int(idx)) for name, seq, idx in rows}


def test_backlog_figures_never_count_the_outbox(db_url: str) -> None:
    """The console's destinations, `/metrics` and `/readyz` take pending and dead counts from the
    outbox rollup, which reads no row of the outbox, and probe the oldest pending row per
    destination for its age (along an index: no sequential scan)."""
    events = [e for i in range(40) for e in lifecycle(i)]
    ingest_events(db_url, console_settings(), events, now=NOW)
    with psycopg.connect(db_url) as conn, conn.transaction():
        waiting = conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone()
        assert waiting is not None and waiting[0] >= 200
        conn.execute("SET LOCAL enable_seqscan = off")
        fetch = "SELECT seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'outbox'"
        before = conn.execute(fetch).fetchone()
        counted = rollups.outbox(conn)
        between = conn.execute(fetch).fetchone()
        depth = outbox_store.depths(conn, NOW + timedelta(minutes=1))
        ready = outbox_store.readiness(conn)
        after = conn.execute(fetch).fetchone()
        assert [(r["status"], r["rows"]) for r in counted] == [("pending", waiting[0])]
        assert depth[(APP, "segment")].pending == ready.pending == waiting[0]
        assert depth[(APP, "segment")].oldest_pending_seconds == pytest.approx(60, abs=1)
        assert between == before  # the counts read nothing of the outbox
        assert before is not None and after is not None and after[0] == before[0]  # no sequential scan


def test_subscriber_page_and_search_never_scan_the_event_log(db_url: str) -> None:
    """With sequential scans priced out, the planner still takes one where no index serves a
    statement; the transaction's own counters (pg_stat_xact_user_tables) show whether it did."""
    events = [e for i in range(40) for e in lifecycle(i)]
    ingest_events(db_url, console_settings(), events, now=NOW)
    policy = build(console_settings(), database_url=db_url).policy
    with psycopg.connect(db_url) as conn, conn.transaction():
        conn.execute("ANALYZE event_log")
        conn.execute("SET LOCAL enable_seqscan = off")
        before = _seq_scans(conn)
        page = pages.load_subscriber(conn, policy, "user-s000007", NOW)
        assert page is not None and page["found"].entries
        for q in ("user-s000007", "s000007", "s000007-2", "nothing-here", f"{APP}/app_store/s000007"):
            queries.find(conn, q, [APP])
        assert _seq_scans(conn) == before
        conn.execute("SELECT count(*) FROM event_log WHERE raw = 'x'")  # the check can fail: no index on raw
        assert _seq_scans(conn) == before + 1


# -- the overview's revenue, last verify and reconciliation gaps --------------------------------------


def ingest_recovered(db_url: str, events: list[dict[str, Any]], received: datetime) -> None:
    """Canonical events logged as reconciliation found them (arrival = reconciliation)."""
    policy = IngestPolicy(destinations=console_settings().destinations("test"),
                          horizon=console_settings().historical_horizon)
    with psycopg.connect(db_url) as conn:
        items = [Incoming(Notification.of(parse_event(e)), repr(e).encode(), arrival="reconciliation") for e in events]
        ingest(conn, items, policy, received)


def test_overview_shows_revenue_per_day_per_app_last_verify_and_gaps(client: TestClient, db_url: str) -> None:
    sign_in(client)
    page = client.get("/console").text
    # three lifecycles, each converting and renewing twice at 9.99 USD on 2026-09-08, -15 and -22
    assert "Revenue per day" in page and "<strong>com.test.app</strong>: 89.91 USD in 30 days from 9 priced" in page
    assert page.count('class="gain"><title>') == 3 and "2026-09-15: 29.97 USD (3 charges" in page
    assert "Never run on this database" in page and "No gaps" in page
    with psycopg.connect(db_url) as conn:
        verify_runs.record(conn, verify_runs.VerifyRun(NOW - timedelta(hours=2), NOW - timedelta(hours=2, seconds=3),
                                                       True, 42, 3, 0, None))
    page = client.get("/console").text
    assert "<strong>ok</strong>: 42 log entries chain correctly; 3 subscriptions" in page
    assert "2 h 0 min ago" in page and "took 3 s" in page
    with psycopg.connect(db_url) as conn:
        verify_runs.record(conn, verify_runs.VerifyRun(NOW - timedelta(minutes=5), NOW - timedelta(minutes=6),
                                                       False, 42, 3, 2, 7))
    page = client.get("/console").text
    assert "<strong>failed</strong>: 2 problems in 42 log entries" in page and 'href="/console/entries/7"' in page
    assert "5 min 0 s ago" in page
    lost = lifecycle(90, renewals=0)
    ingest_recovered(db_url, lost[:1], NOW - timedelta(days=3))
    ingest_recovered(db_url, lost[1:2], NOW - timedelta(hours=1))
    gaps = client.get("/console").text
    assert '<td>com.test.app</td><td>custom</td><td class="n">1</td><td class="n">2</td>' in gaps


def test_a_refund_is_drawn_below_the_baseline(client: TestClient, db_url: str) -> None:
    refund = {"app_id": APP, "subscription_id": "s000001", "store": "app_store", "id": "s000001-refund",
              "type": "refund", "occurred_at": (NOW - timedelta(days=2)).isoformat(), "price": "50", "currency": "USD",
              "transaction_id": "s000001-t3", "app_user_id": "user-s000001"}
    ingest_events(db_url, console_settings(), [refund], now=NOW)
    page = client.get("/console", headers={"Authorization": f"Bearer {TOKEN}"}).text
    day = (NOW - timedelta(days=2)).date().isoformat()
    assert re.search(rf'class="loss"><title>{day}: -\d+\.\d\d USD', page), "a net-negative day is drawn in red"


def test_verify_records_its_result_for_the_console(db_url: str, seeded: dict[str, str]) -> None:
    before = datetime.now(UTC)
    result = CliRunner().invoke(cli, ["verify", "--database-url", db_url])
    assert result.exit_code == 0, result.output
    with psycopg.connect(db_url) as conn:
        last = verify_runs.last(conn)
        entries = conn.execute("SELECT count(*) FROM event_log").fetchone()
    assert last is not None and last.ok and entries is not None and last.entries == entries[0]
    assert last.problem_count == 0 and last.first_bad_position is None and last.subscriptions == 3
    assert before <= last.started_at <= last.finished_at


def test_verify_runs_keep_the_newest_hundred(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        for n in range(verify_runs.KEEP + 5):
            assert verify_runs.record(conn, verify_runs.VerifyRun(NOW + timedelta(seconds=n), NOW, True, n, 0, 0,
                                                                  None)) is None
        assert conn.execute("SELECT count(*) FROM verify_runs").fetchone() == (verify_runs.KEEP,)
        last = verify_runs.last(conn)
        assert last is not None and last.entries == verify_runs.KEEP + 4
    with psycopg.connect(db_url) as conn:  # a role that may only read: a reason comes back, nothing raises
        role = f"console_probe_{uuid.uuid4().hex[:8]}"
        conn.execute(psycopg.sql.SQL("CREATE ROLE {}").format(psycopg.sql.Identifier(role)))  # undone below
        conn.execute(psycopg.sql.SQL("GRANT SELECT ON verify_runs TO {}").format(psycopg.sql.Identifier(role)))
        conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(role)))
        problem = verify_runs.record(conn, verify_runs.VerifyRun(NOW + timedelta(days=1), NOW, True, 1, 0, 0, None))
        assert problem is not None and "permission denied" in problem
        conn.rollback()  # the role was made in this transaction: it goes with it


# -- search by a store's transaction id ---------------------------------------------------------------


def test_search_finds_a_store_transaction_id(client: TestClient) -> None:
    sign_in(client)
    found = client.get("/console/search", params={"q": "s000002-t2"})
    assert found.status_code == 303 and found.headers["location"] == f"/console/subscribers/{APP}/app_store/s000002"
    assert "Nothing matches" in client.get("/console/search?q=s000002-t9").text


def test_search_by_apple_transaction_id_and_signature_results(db_url: str, tmp_path: Any) -> None:
    """An Apple notification arrives by webhook; its transactionId finds the subscription, and the
    payload viewer re-verifies the stored JWS: against the configured root it verifies, against
    another root (a console configured differently) it fails. Other sources say what is known."""
    from apple_signing import make_ca, notification, transaction
    from webhooks_support import CA, STRIPE_APP, config_dict, stripe_headers, write_root

    root = write_root(tmp_path)
    data = {**config_dict(root), "api_token": TOKEN}
    txn = transaction(original_transaction_id="2000000999", transaction_id="2000000999-renew", trial=False)
    raw = notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=txn, notification_uuid="n-console-1")
    stripe_raw = orjson.dumps({"id": "evt_console_1", "object": "event", "type": "customer.created",
                               "created": int(NOW.timestamp()), "data": {"object": {"id": "cus_1"}}})
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(build(settings_module.from_dict(data), database_url=db_url)),
                    follow_redirects=False) as c:
        assert c.post("/webhooks/apple", content=raw, headers={"Content-Type": "application/json"}).status_code == 200
        assert c.post(f"/webhooks/stripe/{STRIPE_APP}", content=stripe_raw,
                      headers=stripe_headers(stripe_raw)).status_code == 200
        found = c.get("/console/search", params={"q": "2000000999-renew"}, headers=bearer)
        assert found.status_code == 303, found.text
        assert found.headers["location"] == "/console/subscribers/com.example.fitness/app_store/2000000999"
        with psycopg.connect(db_url) as conn:
            positions = dict(conn.execute("SELECT source, position FROM event_log").fetchall())
        apple = c.get(f"/console/entries/{positions['apple']}", headers=bearer).text
        assert "Signature: verified</strong>" in apple and "re-verified now" in apple and "com.example.fitness" in apple
        stripe = c.get(f"/console/entries/{positions['stripe']}", headers=bearer).text
        assert "Signature: not recorded</strong>" in stripe and "Stripe-Signature" in stripe
        timeline = c.get("/console/subscribers/com.example.fitness/app_store/2000000999", headers=bearer).text
        assert "#signature\">signed JWS</a>" in timeline
    sources = signature.offline_apple(settings_module.from_dict(data))  # a reconciled Apple entry: the same JWS
    assert signature.verdict("apple", "reconciliation", raw, sources).state == "verified"
    assert signature.verdict("apple", "push", raw[:-40] + b'"}', sources).state == "failed"
    assert signature.verdict("apple", "push", raw, None).state == "unchecked"
    other = tmp_path / "other"
    other.mkdir()
    data_other = {**config_dict(write_root(other, make_ca())), "api_token": TOKEN}
    with TestClient(create_app(build(settings_module.from_dict(data_other), database_url=db_url)),
                    follow_redirects=False) as c:
        page = c.get(f"/console/entries/{positions['apple']}", headers=bearer).text
        assert "Signature: failed</strong>" in page and "does not verify" in html.unescape(page)


def test_canonical_and_recovered_entries_are_not_signed(client: TestClient, db_url: str) -> None:
    sign_in(client)
    assert "Signature: not signed</strong> — a canonical event" in client.get("/console/entries/1").text
    ingest_recovered(db_url, lifecycle(91, renewals=0)[:1], NOW)
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT max(position) FROM event_log WHERE arrival = 'reconciliation'").fetchone()
    assert row is not None
    page = client.get(f"/console/entries/{row[0]}").text
    assert "Signature: not signed</strong> — recovered by" in page and "Arrived by reconciliation" in page


# -- the sign-in throttle -----------------------------------------------------------------------------


def test_sign_in_refuses_an_address_after_five_failures_a_minute(client: TestClient, clock: Clock) -> None:
    for _ in range(5):
        assert sign_in(client, "wrong").status_code == 401
    refused = sign_in(client)  # even the right token: the address is held for the rest of the minute
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert "Too many sign-in attempts" in refused.text and "Try again in 60 seconds" in refused.text
    assert auth.SESSION_COOKIE not in client.cookies
    clock.now = NOW + timedelta(seconds=30)
    assert sign_in(client).headers["retry-after"] == "30"
    clock.now = NOW + timedelta(seconds=60)
    assert sign_in(client).status_code == 303  # the failures aged out
    clock.now = NOW + timedelta(seconds=61)
    for _ in range(4):
        sign_in(client, "wrong")
    assert sign_in(client).status_code == 303  # a success forgets the failures
    assert client.get("/console").status_code == 200


def test_the_throttle_counts_per_address_and_forgets_the_oldest() -> None:
    throttle = auth.LoginThrottle(limit=2, window=60, max_clients=2)
    for _ in range(2):
        throttle.failed("10.0.0.1", NOW)
    assert throttle.retry_after("10.0.0.1", NOW) == 60 and throttle.retry_after("10.0.0.2", NOW) is None
    throttle.failed("10.0.0.2", NOW)
    throttle.failed("10.0.0.3", NOW)  # a third address: the least recently seen is forgotten
    assert throttle.retry_after("10.0.0.1", NOW) is None
    assert throttle.retry_after("10.0.0.1", NOW + timedelta(seconds=61)) is None


def _plan(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> str:
    return "\n".join(str(r[0]) for r in conn.execute("EXPLAIN " + sql, params).fetchall())


def test_overview_and_transaction_search_read_only_their_indexes(db_url: str) -> None:
    """The overview's counts (log, transitions by kind and day, revenue, deliveries, the outbox) are
    the rollups': its statements read no row of `transitions` and never scan `event_log` or the
    outbox (the transaction's own counters, pg_stat_xact_user_tables, say what was read); a
    transaction id is found through the GIN index event_log_references."""
    events = [e for i in range(40) for e in lifecycle(i)]
    ingest_events(db_url, console_settings(), events, now=NOW)
    with psycopg.connect(db_url, autocommit=True) as conn:  # as autovacuum would: statistics, visibility map
        conn.execute("VACUUM ANALYZE event_log")
        conn.execute("VACUUM ANALYZE transitions")
    with psycopg.connect(db_url) as conn, conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        found = _plan(conn, queries.FIND_REFERENCE_SQL, {"q": "s000007-t2"})
        assert "Bitmap Index Scan on event_log_references" in found and "Seq Scan" not in found, found
        before = _reads(conn)
        days = rollups.Days.ending(NOW.date(), 30)
        stats = audit.stats(conn, days.since, days.until, NOW)
        assert stats.from_rollups and sum(int(r["entries"]) for r in stats.log) == len(events)
        by_day = rollups.transitions_by_day(conn, days)
        assert sum(n for _, _, n in by_day) == sum(int(r["live"]) for r in stats.transitions) > 0
        rows = queries.revenue_by_day(conn, days)
        assert sum(r.amount for r in rows) == Decimal("9.99") * 3 * 40
        verify_runs.last(conn)
        pages._gaps(conn, NOW)
        after = _reads(conn)
        assert after["transitions"] == before["transitions"], (before, after)
        assert after["event_log"][0] == before["event_log"][0] and after["outbox"][0] == before["outbox"][0]
        before = _seq_scans(conn)
        hits = queries.find(conn, "s000007-t2", [APP])
        assert [h.path for h in hits] == [f"subscribers/{APP}/app_store/s000007"]
        assert _seq_scans(conn) == before
