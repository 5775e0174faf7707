"""The console in a real browser: Debian's Chromium driven by Playwright against a real uvicorn server.

The server (create_app on 127.0.0.1) and the relay (the scheduler `serve` runs) are started here
and stopped in `finally`; the relay delivers to tests' FakeSegment. Playwright never downloads a
browser: it launches /usr/bin/chromium. Without Chromium these tests skip, except under CI=true,
where .ci/run installs it and a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import uvicorn
from fake_segment import APP, FakeSegment, ingest_events, lifecycle
from test_console import TOKEN, console_settings

from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.app.worker import build_relay, build_scheduler

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def _browser_or_skip() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed"
    else:
        if os.path.exists(CHROMIUM):
            return sync_playwright
        reason = f"no Chromium at {CHROMIUM}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests need Chromium in CI: {reason}")
    pytest.skip(f"{reason}: browser tests skipped")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(db_url: str) -> Iterator[dict[str, Any]]:
    """uvicorn + relay over a seeded database, the fake Segment they deliver to, and one dead letter."""
    sync_playwright = _browser_or_skip()
    with FakeSegment() as fake:
        settings = console_settings(fake.url)
        ingest_events(db_url, settings, [e for i in range(3) for e in lifecycle(i)],
                      now=datetime.now(UTC) - timedelta(hours=1))
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT message_id FROM outbox WHERE subscriber = 'user-s000001' ORDER BY id LIMIT 1"
                               ).fetchone()
            assert row is not None
            conn.execute("UPDATE outbox SET status = 'dead', last_error = 'HTTP 400: poison' WHERE message_id = %s",
                         row)
        services = build(settings, database_url=db_url)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(services, pool_size=4), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, daemon=True)
        jobs = build_scheduler(services, build_relay(services, backoff_base=0.1, backoff_cap=0.5), interval=0.2,
                               expirations=False)
        thread.start()
        jobs.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "uvicorn never started"
                time.sleep(0.02)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                try:
                    yield {"base": f"http://127.0.0.1:{port}", "fake": fake, "dead": row[0], "browser": browser,
                           "db_url": db_url}
                finally:
                    browser.close()
        finally:
            jobs.stop(timeout=10)
            server.should_exit = True
            thread.join(timeout=10)


def _wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_an_operator_signs_in_follows_a_subscriber_retries_a_dead_letter_pauses_and_signs_out(
        served: dict[str, Any]) -> None:
    base, fake, dead = served["base"], served["fake"], served["dead"]
    page = served["browser"].new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(10_000)
    page.goto(base + "/console/subscribers/user-s000001")
    assert "/console/login" in page.url  # anonymous: off to sign in, and back after
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/console/subscribers/user-s000001$"))
    assert page.get_by_role("heading", name="Transitions and their messages").is_visible()

    page.goto(base + "/console")
    page.get_by_label("Search").first.fill("user-s000002")
    page.get_by_role("button", name="Search").first.click()
    page.wait_for_url(re.compile(r".*/console/subscribers/user-s000002$"))
    text = page.locator("main").inner_text()
    assert "trial_started" in text and "rc_trial_started_event" in text and "expiration" in text
    page.get_by_role("link", name=re.compile(r"^signed JWS$|^not signed$")).first.click()  # the payload viewer
    assert "Signature: not signed" in page.locator("#signature").inner_text()
    page.goto(base + "/console")
    assert page.get_by_role("heading", name="Last verify").is_visible()
    assert page.get_by_role("heading", name=re.compile("^Revenue per day")).is_visible()
    _wait_for(lambda: fake.capture.distinct() >= 17)  # the relay delivered all but the dead one
    page.goto(base + "/console/subscribers/user-s000002")
    page.reload()
    assert "delivered" in page.locator("table.transitions").inner_text()

    page.goto(base + "/console/dead")
    assert dead in page.locator("main").inner_text()
    page.get_by_label(f"select {dead}").check()
    page.get_by_role("button", name="Retry selected").click()
    page.get_by_role("button", name="Yes, do it").click()
    assert "requeued 1 message" in page.locator(".flash").inner_text()
    _wait_for(lambda: any(m.get("messageId") == dead for m in fake.capture.messages()))

    def shown_delivered() -> bool:  # the sink answers before the relay records the outcome: reload until then
        page.goto(base + f"/console/messages/{dead}")
        return "delivered" in page.locator("h1").inner_text()

    _wait_for(shown_delivered)
    assert "delivered" in page.locator("h1").inner_text()

    page.goto(base + "/console/destinations")
    page.get_by_role("button", name=f"Pause {APP} segment").click()
    page.get_by_role("button", name="Yes, do it").click()
    assert "paused" in page.locator(".flash").inner_text()
    with psycopg.connect(served["db_url"]) as conn:
        assert conn.execute("SELECT paused FROM destination_state").fetchone() == (True,)
    page.get_by_role("button", name=f"Resume {APP} segment").click()
    page.get_by_role("button", name="Yes, do it").click()
    assert "resumed" in page.locator(".flash").inner_text()
    with psycopg.connect(served["db_url"]) as conn:
        assert conn.execute("SELECT paused FROM destination_state").fetchone() == (False,)

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the page still lays out, nothing hidden
    page.goto(base + "/console/subscribers/user-s000002")
    assert page.get_by_role("button", name="Sign out").is_visible()
    shot = os.environ.get("SUBLEDGER_CONSOLE_SCREENSHOT")
    if shot:
        page.set_viewport_size({"width": 1280, "height": 900})
        page.screenshot(path=shot, full_page=True)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r".*/console/login$"))
    page.goto(base + "/console/deliveries")
    assert "/console/login?next=" in page.url


def test_anonymous_browsers_see_only_the_sign_in_page(served: dict[str, Any]) -> None:
    page = served["browser"].new_page()
    for path in ("/console", "/console/dead", "/console/static/console.css", f"/console/messages/{served['dead']}"):
        page.goto(served["base"] + path)
        assert "/console/login?next=" in page.url, path
        assert "user-s000001" not in page.content() and "poison" not in page.content()  # no data, only a form
    page.get_by_label("API token").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    assert "Sign-in refused" in page.get_by_role("alert").inner_text()
    for _ in range(4):  # five wrong tokens in a minute: the form then refuses this address for a while
        page.get_by_label("API token").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("heading", name="Too many sign-in attempts").is_visible()
    assert "Try again in" in page.get_by_role("alert").inner_text()
