"""Google Play end to end: POST /webhooks/google (Pub/Sub push) → state fetched from a fake Google API
→ log → fold → relay → fake Segment. Each scenario changes the fake's state between deliveries, as
Google's state moves between notifications, and asserts the exact Segment messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fake_google import PACKAGE, TOKEN, FakeGoogle, developer_notification, order, push_body, subscription_v2
from fastapi.testclient import TestClient
from webhooks_support import (
    SANDBOX_KEY,
    WRITE_KEY,
    Pipeline,
    config_dict,
    log_count,
    statuses,
    superseded,
    track,
    tracks,
    write_root,
)

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app

GOOGLE_APP = PACKAGE  # the app's key is its package name
PATH = "/webhooks/google"
USER = "user_play_1"
MONTHLY = "premium_monthly"
YEARLY = "premium_yearly"
T0 = datetime(2026, 10, 1, 10, 0, tzinfo=UTC)
ORDER = "GPA.3333-4137-0319-36762"
COMMON = {"store": "PLAY_STORE", "environment": "PRODUCTION"}
JSON = {"Content-Type": "application/json"}


def google_config(root: Path, segment: str, google: str, **extra: Any) -> dict[str, Any]:
    config = config_dict(root, segment)
    destination = next(iter(config["apps"].values()))["destinations"]["segment"]
    config["apps"][GOOGLE_APP] = {
        "destinations": {"segment": dict(destination)},
        "google": {"access_token": TOKEN, "api_base_url": google, "retries": 2, "backoff_seconds": 0.01,
                   "timeout_seconds": 0.5, **extra},
    }
    return config


class GooglePipeline(Pipeline):
    def __init__(self, client: TestClient, fake: Any, settings: Any, db_url: str, google: FakeGoogle) -> None:
        super().__init__(client, fake, settings, db_url)
        self.google = google
        self.sent = 0

    def deliver(self, kind: int, token: str, at: datetime, message_id: str | None = None,
                **extra: Any) -> dict[str, Any]:
        self.sent += 1
        body = push_body(developer_notification(kind, token, at, **extra), message_id or f"msg-{self.sent}")
        return self.post(PATH, body, JSON)


@contextmanager
def google_pipeline(db_url: str, root: Path, **extra: Any) -> Iterator[GooglePipeline]:
    from fake_segment import FakeSegment

    with FakeSegment(write_keys=(WRITE_KEY, SANDBOX_KEY)) as segment, FakeGoogle() as google:
        settings = settings_module.from_dict(google_config(root, segment.url, google.url, **extra))
        with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
            yield GooglePipeline(client, segment, settings, db_url, google)


@pytest.fixture
def p(db_url: str, tmp_path: Path) -> Iterator[GooglePipeline]:
    with google_pipeline(db_url, write_root(tmp_path)) as running:
        yield running


def state(p: GooglePipeline, token: str, product: str, expiry: datetime, order_id: str, **kw: Any) -> None:
    p.google.subscriptions[token] = subscription_v2(product, expiry, order_id=order_id, **kw)


def charged(p: GooglePipeline, order_id: str, product: str, total: str, phase: str = "basePrice") -> None:
    p.google.orders[order_id] = order(order_id, product, total, phase=phase)


def paid_start(p: GooglePipeline, token: str = "tok-A") -> None:
    state(p, token, MONTHLY, T0 + timedelta(days=30), ORDER)
    charged(p, ORDER, MONTHLY, "9.99")
    p.deliver(4, token, T0)


PAID = {"currency": "USD", "product_id": MONTHLY, "period_type": "NORMAL", **COMMON}


def test_trial_converted_renewal_cancellation_expiration(p: GooglePipeline) -> None:
    tok = "tok-A"
    day = timedelta(days=1)
    state(p, tok, MONTHLY, T0 + 7 * day, ORDER, phase="freeTrial")
    charged(p, ORDER, MONTHLY, "0", phase="freeTrial")
    p.deliver(4, tok, T0)
    state(p, tok, MONTHLY, T0 + 37 * day, ORDER + "..0")
    charged(p, ORDER + "..0", MONTHLY, "9.99")
    p.deliver(2, tok, T0 + 7 * day)
    state(p, tok, MONTHLY, T0 + 67 * day, ORDER + "..1")
    charged(p, ORDER + "..1", MONTHLY, "9.99")
    p.deliver(2, tok, T0 + 37 * day)
    state(p, tok, MONTHLY, T0 + 67 * day, ORDER + "..1", auto_renew=False, state="SUBSCRIPTION_STATE_CANCELED",
          canceled="userInitiatedCancellation")
    p.deliver(3, tok, T0 + 40 * day)
    state(p, tok, MONTHLY, T0 + 67 * day, ORDER + "..1", auto_renew=False, state="SUBSCRIPTION_STATE_EXPIRED",
          canceled="userInitiatedCancellation")
    p.deliver(13, tok, T0 + 67 * day)
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, product_id=MONTHLY, period_type="TRIAL", transaction_id=ORDER,
              **COMMON),
        track("rc_trial_converted_event", USER, revenue=9.99, transaction_id=ORDER + "..0", **PAID),
        track("rc_renewal_event", USER, revenue=9.99, transaction_id=ORDER + "..1", **PAID),
        track("rc_cancellation_event", USER, product_id=MONTHLY, period_type="NORMAL", cancel_reason="UNSUBSCRIBE",
              **COMMON),
        track("rc_expiration_event", USER, product_id=MONTHLY, period_type="NORMAL", expiration_reason="UNSUBSCRIBE",
              **COMMON),
    ]
    assert statuses(messages) == ["trial", "active", "active", "cancelled", "expired"]
    converted = next(m for m in messages if m.get("event") == "rc_trial_converted_event")
    assert converted["properties"]["original_transaction_id"] == tok
    assert converted["properties"]["app_id"] == GOOGLE_APP
    assert converted["properties"]["country_code"] == "US"


def test_trial_cancelled(p: GooglePipeline) -> None:
    tok = "tok-A"
    end = T0 + timedelta(days=7)
    state(p, tok, MONTHLY, end, ORDER, phase="freeTrial")
    charged(p, ORDER, MONTHLY, "0", phase="freeTrial")
    p.deliver(4, tok, T0)
    state(p, tok, MONTHLY, end, ORDER, phase="freeTrial", auto_renew=False, state="SUBSCRIPTION_STATE_CANCELED",
          canceled="userInitiatedCancellation")
    p.deliver(3, tok, T0 + timedelta(days=2))
    state(p, tok, MONTHLY, end, ORDER, phase="freeTrial", auto_renew=False, state="SUBSCRIPTION_STATE_EXPIRED",
          canceled="userInitiatedCancellation")
    p.deliver(13, tok, end)
    messages = p.relay()
    trial = {"product_id": MONTHLY, "period_type": "TRIAL", **COMMON}
    assert tracks(messages) == [
        track("rc_trial_started_event", USER, transaction_id=ORDER, **trial),
        track("rc_trial_cancelled_event", USER, cancel_reason="UNSUBSCRIBE", **trial),
        track("rc_expiration_event", USER, expiration_reason="UNSUBSCRIBE", **trial),
    ]
    assert statuses(messages) == ["trial", "cancelled_trial", "expired"]


def test_grace_period_then_recovered(p: GooglePipeline) -> None:
    tok = "tok-A"
    due = T0 + timedelta(days=30)
    paid_start(p, tok)
    state(p, tok, MONTHLY, due + timedelta(days=3), ORDER, state="SUBSCRIPTION_STATE_IN_GRACE_PERIOD")
    p.deliver(6, tok, due)
    state(p, tok, MONTHLY, due + timedelta(days=30), ORDER + "..0")
    charged(p, ORDER + "..0", MONTHLY, "9.99")
    p.deliver(1, tok, due + timedelta(days=2))
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id=ORDER, **PAID),
        track("rc_billing_issue_event", USER, product_id=MONTHLY, period_type="NORMAL", **COMMON),
        track("rc_renewal_event", USER, revenue=9.99, transaction_id=ORDER + "..0", **PAID),
    ]
    assert statuses(messages) == ["active", "grace_period", "active"]


def test_account_hold_then_expired(p: GooglePipeline) -> None:
    tok = "tok-A"
    due = T0 + timedelta(days=30)
    paid_start(p, tok)
    state(p, tok, MONTHLY, due, ORDER, state="SUBSCRIPTION_STATE_ON_HOLD")
    p.deliver(5, tok, due)
    gone = {"auto_renew": False, "state": "SUBSCRIPTION_STATE_EXPIRED", "canceled": "systemInitiatedCancellation"}
    state(p, tok, MONTHLY, due, ORDER, **gone)
    p.deliver(3, tok, due + timedelta(days=30))
    p.deliver(13, tok, due + timedelta(days=30, seconds=1))
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id=ORDER, **PAID),
        track("rc_billing_issue_event", USER, product_id=MONTHLY, period_type="NORMAL", **COMMON),
        track("rc_cancellation_event", USER, product_id=MONTHLY, period_type="NORMAL", cancel_reason="BILLING_ERROR",
              **COMMON),
        track("rc_expiration_event", USER, product_id=MONTHLY, period_type="NORMAL",
              expiration_reason="BILLING_ERROR", **COMMON),
    ]
    assert statuses(messages) == ["active", "grace_period", "grace_period", "expired"]


def test_upgrade_through_a_linked_token_is_one_subscription(p: GooglePipeline) -> None:
    old, new, new_order = "tok-A", "tok-B", "GPA.9999-0000-1111-22222"
    paid_start(p, old)
    upgraded = T0 + timedelta(days=10)
    state(p, new, YEARLY, upgraded + timedelta(days=365), new_order, linked=old, price="59.99")
    charged(p, new_order, YEARLY, "49.99")  # prorated charge for the rest of the period
    p.deliver(4, new, upgraded)
    # the old token is cancelled by the replacement: part of the change, not churn
    state(p, old, MONTHLY, upgraded, ORDER, auto_renew=False, state="SUBSCRIPTION_STATE_EXPIRED",
          canceled="replacementCancellation")
    p.deliver(3, old, upgraded + timedelta(seconds=5))
    p.deliver(13, old, upgraded + timedelta(seconds=6))
    state(p, new, YEARLY, upgraded + timedelta(days=730), new_order + "..0", linked=old, price="59.99")
    charged(p, new_order + "..0", YEARLY, "59.99")
    p.deliver(2, new, upgraded + timedelta(days=365))
    messages = p.relay()
    yearly = {"currency": "USD", "product_id": YEARLY, "period_type": "NORMAL", **COMMON}
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id=ORDER, **PAID),
        track("rc_product_change_event", USER, product_id=MONTHLY, new_product_id=YEARLY, period_type="NORMAL",
              **COMMON),
        track("rc_renewal_event", USER, revenue=49.99, transaction_id=new_order, **yearly),
        track("rc_renewal_event", USER, revenue=59.99, transaction_id=new_order + "..0", **yearly),
    ]
    assert {m["properties"]["original_transaction_id"] for m in messages if m["type"] == "track"} == {old}
    assert statuses(messages)[-1] == "active"
    with psycopg.connect(p.db_url) as conn:
        kinds = [k for (k,) in conn.execute("SELECT kind FROM event_log ORDER BY position")]
        keys = {k for (k,) in conn.execute("SELECT DISTINCT subscription_key FROM event_log")}
    assert kinds == ["SUBSCRIPTION_PURCHASED", "SUBSCRIPTION_PURCHASED", "SUBSCRIPTION_CANCELED/REPLACED",
                     "SUBSCRIPTION_EXPIRED/REPLACED", "SUBSCRIPTION_RENEWED"]
    assert keys == {f"{GOOGLE_APP}/play_store/{old}"}


def test_pause_then_resume(p: GooglePipeline) -> None:
    tok = "tok-A"
    due = T0 + timedelta(days=30)
    paid_start(p, tok)
    p.deliver(11, tok, T0 + timedelta(days=20))
    state(p, tok, MONTHLY, due, ORDER, state="SUBSCRIPTION_STATE_PAUSED", paused_until=due + timedelta(days=30))
    p.deliver(10, tok, due)
    state(p, tok, MONTHLY, due + timedelta(days=60), ORDER + "..0")
    charged(p, ORDER + "..0", MONTHLY, "9.99")
    p.deliver(1, tok, due + timedelta(days=30))
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id=ORDER, **PAID),
        track("rc_subscription_paused_event", USER, product_id=MONTHLY, period_type="NORMAL", **COMMON),
        track("rc_renewal_event", USER, revenue=9.99, transaction_id=ORDER + "..0", **PAID),
    ]
    assert statuses(messages) == ["active", "active", "active"]


def test_refund_by_voided_purchase_is_negative_revenue_and_revoke_expires(p: GooglePipeline) -> None:
    tok = "tok-A"
    paid_start(p, tok)
    refunded = T0 + timedelta(days=3)
    p.deliver(None, tok, refunded, family="voided", order_id=ORDER)
    state(p, tok, MONTHLY, refunded, ORDER, auto_renew=False, state="SUBSCRIPTION_STATE_EXPIRED")
    p.deliver(12, tok, refunded + timedelta(seconds=1))
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_initial_purchase_event", USER, revenue=9.99, transaction_id=ORDER, **PAID),
        track("rc_cancellation_event", USER, revenue=-9.99, currency="USD", product_id=MONTHLY,
              period_type="NORMAL", transaction_id=ORDER, cancel_reason="CUSTOMER_SUPPORT", **COMMON),
        track("rc_expiration_event", USER, product_id=MONTHLY, period_type="NORMAL",
              expiration_reason="CUSTOMER_SUPPORT", **COMMON),
    ]


def test_the_same_message_twice_is_stored_and_fetched_once(p: GooglePipeline) -> None:
    state(p, "tok-A", MONTHLY, T0 + timedelta(days=30), ORDER)
    charged(p, ORDER, MONTHLY, "9.99")
    first = p.deliver(4, "tok-A", T0, message_id="136969346945")
    again = p.deliver(4, "tok-A", T0, message_id="136969346945")
    assert (first["result"], again["result"]) == ("new", "duplicate")
    assert (len(first["transitions"]), again["transitions"]) == (1, [])
    assert log_count(p.db_url) == 1
    assert len(p.google.api_requests()) == 2  # subscriptionsv2 + order, for the first delivery only
    assert [m["event"] for m in p.relay() if m["type"] == "track"] == ["rc_initial_purchase_event"]


def test_a_pair_out_of_order_settles_as_if_in_order(p: GooglePipeline) -> None:
    """The renewal arrives first; both fetches see the converted state, yet the purchase finds its own
    (trial) order by the order id's base, and the fold re-orders by event time."""
    tok = "tok-A"
    state(p, tok, MONTHLY, T0 + timedelta(days=37), ORDER + "..0")
    charged(p, ORDER, MONTHLY, "0", phase="freeTrial")
    charged(p, ORDER + "..0", MONTHLY, "9.99")
    p.deliver(2, tok, T0 + timedelta(days=7))
    p.deliver(4, tok, T0)
    messages = p.relay()
    assert [(t["event"], t["revenue"], t["period_type"], t["transaction_id"]) for t in tracks(messages)] == [
        ("rc_trial_started_event", None, "TRIAL", ORDER),
        ("rc_trial_converted_event", 9.99, "NORMAL", ORDER + "..0"),
    ]
    assert superseded(p.db_url) == 1  # the renewal derived before the purchase arrived


def test_log_keeps_the_push_verbatim_and_the_fetched_state_beside_it(p: GooglePipeline) -> None:
    paid_start(p)
    with psycopg.connect(p.db_url) as conn:
        raw, facts = conn.execute("SELECT raw, facts FROM event_log").fetchone()  # type: ignore[misc]
    envelope = json.loads(bytes(raw))
    assert envelope["message"]["messageId"] == "msg-1"
    fetched = facts["events"][0]["attributes"]["google_fetched"]
    assert fetched["subscriptionsv2"]["lineItems"][0]["latestSuccessfulOrderId"] == ORDER
    assert fetched["order"]["total"] == {"currencyCode": "USD", "units": "9", "nanos": 990000000}


def test_a_one_time_product_and_a_test_purchase(p: GooglePipeline) -> None:
    p.google.products[("coins_100", "tok-OTP")] = {"orderId": "GPA.7777-0000-1111-22222", "purchaseState": 0,
                                                   "obfuscatedExternalAccountId": USER, "regionCode": "FR"}
    charged(p, "GPA.7777-0000-1111-22222", "coins_100", "1.99")
    p.deliver(1, "tok-OTP", T0, family="one_time", sku="coins_100")
    state(p, "tok-T", MONTHLY, T0 + timedelta(days=30), "GPA.5", test=True)
    charged(p, "GPA.5", MONTHLY, "9.99")
    p.deliver(4, "tok-T", T0 + timedelta(hours=1))
    messages = p.relay()
    assert tracks(messages) == [
        track("rc_non_subscription_purchase_event", USER, revenue=1.99, currency="USD", product_id="coins_100",
              transaction_id="GPA.7777-0000-1111-22222", **COMMON),
        track("rc_initial_purchase_event", USER, revenue=9.99, currency="USD", product_id=MONTHLY,
              period_type="NORMAL", transaction_id="GPA.5", store="PLAY_STORE", environment="SANDBOX"),
    ]
    by_key = {m["properties"]["transaction_id"]: r.write_key
              for r in p.fake.capture.requests for m in r.messages if m["type"] == "track"}
    assert by_key == {"GPA.7777-0000-1111-22222": WRITE_KEY, "GPA.5": SANDBOX_KEY}  # test purchases: sandbox key


EXPORT_SQL = """
SELECT CASE WHEN facts->'events'->0->'attributes' ? 'google_fetched'
            THEN (convert_from(raw, 'UTF8')::jsonb
                  || jsonb_build_object('subledger_fetched', facts->'events'->0->'attributes'->'google_fetched'))::text
            ELSE convert_from(raw, 'UTF8') END,
       facts
FROM event_log WHERE source = 'google' ORDER BY position
"""


def test_an_export_of_the_log_maps_again_without_google(p: GooglePipeline) -> None:
    """docs/google.md's export query: each line with facts maps, with no fetch, to exactly the facts
    logged; a stored-only entry exports as the bare push (it has no facts to keep the state in)."""
    from subledger.app.google_api import GoogleLinks, split_capture
    from subledger.core.sources.google import GoogleConfig, map_push, parse_push
    from subledger.store.log import facts_of

    test_upgrade_through_a_linked_token_is_one_subscription(p)
    config = GoogleConfig(app_id=GOOGLE_APP, package_name=PACKAGE)
    links = GoogleLinks(None, GOOGLE_APP)
    with psycopg.connect(p.db_url) as conn:
        rows = conn.execute(EXPORT_SQL).fetchall()
    assert len(rows) == 5
    assert [facts["events"] == [] for _, facts in rows] == [False, False, True, True, False]
    for line, facts in rows:
        body, stored = split_capture(line.encode())
        if stored is None:
            assert facts["events"] == [] and facts["kind"].endswith("/REPLACED")
            continue
        notification = map_push(parse_push(body), stored, config, chain=links)
        links.remember(notification)
        assert json.loads(json.dumps(facts_of(notification), default=str)) == facts
