"""POST /webhooks/amazon and `ingest --format amazon`: SNS subscription confirmation, signature
refusals (nothing stored, RVS never asked), RVS failures (424, 503 with Retry-After, stored only),
redeliveries answered from the log, and lifecycles end to end to a fake Segment on 127.0.0.1."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fake_amazon import (
    EXPIRED,
    GOOD,
    OTHER,
    SECRET,
    TOPIC,
    USER,
    FakeAmazon,
    amazon_settings,
    confirmation_body,
    make_signer,
    receipt,
    rtn_message,
    sns_body,
)
from fastapi.testclient import TestClient
from webhooks_support import SANDBOX_KEY, WRITE_KEY, Pipeline, log_count, tracks

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.app.stream_ingest import ingest_stream
from subledger.core.errors import ConfigError

PATH = "/webhooks/amazon"
APP = "com.example.fitness.fire"
TEXT = {"Content-Type": "text/plain; charset=UTF-8"}  # what SNS sends
R1 = "koxIn_LO2u7rc-_MF40hKz1vqSSJSlitfTNDeH_JAs8=:3:11"
R2 = "R4TWNm8Uspo4Ujio51B5_7xBnRFzr4B2k9Bv48_7mRY=:3:11"


def now() -> datetime:
    return datetime.now(UTC)


def config(fake: FakeAmazon, endpoint: str = "http://127.0.0.1:9", **amazon: Any) -> dict[str, Any]:
    destination = {"write_key": WRITE_KEY, "sandbox_write_key": SANDBOX_KEY, "endpoint": endpoint,
                   "send_sandbox": True, "publish_historical": True, "timeout_seconds": 2.0}
    return {"apps": {APP: {"destinations": {"segment": destination}, "amazon": amazon_settings(fake, **amazon)}}}


@pytest.fixture
def fake() -> Iterator[FakeAmazon]:
    with FakeAmazon(hang_seconds=0.8) as amazon:
        yield amazon


@contextmanager
def client_for(db_url: str, fake: FakeAmazon, **amazon: Any) -> Iterator[TestClient]:
    settings = settings_module.from_dict(config(fake, **amazon))
    with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
        yield client


@pytest.fixture
def client(db_url: str, fake: FakeAmazon) -> Iterator[TestClient]:
    with client_for(db_url, fake) as c:
        yield c


def post(client: TestClient, body: bytes) -> Any:
    return client.post(PATH, content=body, headers=TEXT)


def note(fake: FakeAmazon, kind: str, rid: str = R1, at: datetime | None = None, **extra: Any) -> bytes:
    sign = {k: extra.pop(k) for k in ("signer", "version", "tamper", "message_id", "topic") if k in extra}
    cert_url = extra.pop("cert_url", fake.cert_url())
    return sns_body(rtn_message(kind, rid, at or now(), **extra), cert_url, **sign)


def logged(db_url: str) -> list[tuple[str, str, dict[str, Any]]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT external_id, kind, facts FROM event_log ORDER BY position").fetchall()
    return [(e, k, f) for e, k, f in rows]


# --- subscription confirmation -----------------------------------------------------------------


def test_a_subscription_confirmation_is_verified_and_confirmed(client: TestClient, fake: FakeAmazon,
                                                               db_url: str) -> None:
    body = confirmation_body(fake.cert_url(), f"{fake.url}/confirm")
    response = post(client, body)
    assert response.status_code == 200, response.text
    assert (response.json()["result"], response.json()["topic"]) == ("confirmed", TOPIC)
    assert response.json()["token"] == json.loads(body)["Token"]
    (confirmed,) = fake.confirmed
    assert "Action=ConfirmSubscription" in confirmed
    assert log_count(db_url) == 0


def test_a_confirmation_with_a_bad_signature_confirms_nothing(client: TestClient, fake: FakeAmazon) -> None:
    body = confirmation_body(fake.cert_url(), f"{fake.url}/confirm", signer=OTHER)
    assert post(client, body).status_code == 401
    foreign = confirmation_body(fake.cert_url(), "https://evil.example/confirm")
    assert post(client, foreign).status_code == 401  # a SubscribeURL off the SNS hosts is never fetched
    assert fake.confirmed == []


def test_confirmations_can_be_left_to_the_operator(db_url: str, fake: FakeAmazon) -> None:
    with client_for(db_url, fake, confirm_subscriptions=False) as c:
        response = post(c, confirmation_body(fake.cert_url(), f"{fake.url}/confirm"))
    assert (response.status_code, response.json()["result"]) == (200, "received")
    assert fake.confirmed == []


# --- signature refusals: 401, nothing stored, RVS never asked ----------------------------------


REFUSALS = {
    "wrong certificate host": ({"cert_url": "https://evil.example/SimpleNotificationService-good.pem"},
                               "SigningCertURL"),
    "aws lookalike host": ({"cert_url": "https://sns.us-east-1.amazonaws.com.evil.example/x.pem"}, "SigningCertURL"),
    "tampered message": ({"tamper": True}, None),
    "other key": ({"signer": OTHER}, "Signature"),
    "expired certificate": ({"signer": EXPIRED, "cert": "expired"}, "SigningCertURL"),
    "unknown SignatureVersion": ({"version": "3"}, "SignatureVersion"),
    "unknown certificate": ({"cert": "missing"}, "SigningCertURL"),
}


def test_signature_refusals_are_401_and_store_nothing(client: TestClient, fake: FakeAmazon, db_url: str) -> None:
    fake.receipts[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    for case, (extra, field) in REFUSALS.items():  # one client for all: each case costs a request, not a database
        extra = dict(extra)
        cert = extra.pop("cert", None)
        if cert:
            extra["cert_url"] = fake.cert_url(cert)
        response = post(client, note(fake, "SUBSCRIPTION_PURCHASED", **extra))
        assert response.status_code == 401, (case, response.text)
        if field:
            assert response.json()["field"] == field, case
    assert log_count(db_url) == 0 and fake.rvs_requests() == []
    assert post(client, note(fake, "SUBSCRIPTION_PURCHASED")).status_code == 200  # the same, signed: accepted


def test_certificates_are_fetched_once_and_both_versions_verify(client: TestClient, fake: FakeAmazon) -> None:
    fake.receipts[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    first = post(client, note(fake, "SUBSCRIPTION_PURCHASED", version="1"))
    second = post(client, note(fake, "SUBSCRIPTION_AUTO_RENEWAL_ON", version="2"))
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert [r for r in fake.requests if r.endswith(".pem")] == ["/SimpleNotificationService-good.pem"]


def test_a_pinned_topic_refuses_others_with_403(db_url: str, fake: FakeAmazon) -> None:
    fake.receipts[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    with client_for(db_url, fake, topic_arns=[TOPIC]) as c:
        other = post(c, note(fake, "SUBSCRIPTION_PURCHASED", topic="arn:aws:sns:us-east-1:1:Other"))
        assert (other.status_code, other.json()["field"]) == (403, "TopicArn")
        assert post(c, note(fake, "SUBSCRIPTION_PURCHASED")).status_code == 200
    assert log_count(db_url) == 1


def test_malformed_bodies_are_400(client: TestClient, db_url: str) -> None:
    for body in (b"{not json", b"[]", b'{"Type": "Surprise"}', b'{"Type": "Notification"}', b"\xff\xfe"):
        assert post(client, body).status_code == 400, body
    assert log_count(db_url) == 0


def test_an_unknown_package_is_404_and_no_amazon_app_is_404(client: TestClient, fake: FakeAmazon,
                                                            db_url: str) -> None:
    response = post(client, note(fake, "SUBSCRIPTION_PURCHASED", package="com.other.app"))
    assert (response.status_code, response.json()["field"]) == (404, "Message.appPackageName")
    with TestClient(create_app(build(settings_module.from_dict({"apps": {"x": {}}}), database_url=db_url),
                               pool_size=1)) as bare:
        assert post(bare, note(fake, "SUBSCRIPTION_PURCHASED")).status_code == 404
        assert post(bare, confirmation_body(fake.cert_url(), f"{fake.url}/confirm")).status_code == 404
    assert log_count(db_url) == 0


def test_a_body_over_the_limit_is_413(client: TestClient) -> None:
    assert client.post(PATH, content=b"x" * 1_000_001, headers=TEXT).status_code == 413


# --- RVS ---------------------------------------------------------------------------------------


def test_a_redelivery_is_a_duplicate_answered_from_the_log(client: TestClient, fake: FakeAmazon,
                                                           db_url: str) -> None:
    fake.receipts[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    at = now()
    first = post(client, note(fake, "SUBSCRIPTION_PURCHASED", at=at, message_id="m-1")).json()
    again = post(client, note(fake, "SUBSCRIPTION_PURCHASED", at=at, message_id="m-2")).json()
    assert (first["result"], again["result"], first["id"]) == ("new", "duplicate", again["id"])
    assert len(first["transitions"]) == 1 and log_count(db_url) == 1
    assert len(fake.rvs_requests()) == 1  # the redelivery never called Amazon


def test_a_refused_shared_secret_is_424_and_stores_nothing(db_url: str, fake: FakeAmazon) -> None:
    fake.receipts[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    with client_for(db_url, fake, shared_secret="stale") as c:
        response = post(c, note(fake, "SUBSCRIPTION_PURCHASED"))
    assert (response.status_code, response.json()["field"]) == (424, "amazon.shared_secret")
    assert "stale" not in response.text and SECRET not in response.text
    assert log_count(db_url) == 0


@pytest.mark.parametrize("fault", [500, 429, "hang"])
def test_rvs_unavailable_is_503_with_retry_after_and_a_redelivery_succeeds(client: TestClient, fake: FakeAmazon,
                                                                           db_url: str, fault: int | str) -> None:
    fake.receipts[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    fake.faults.extend([fault] * 2)  # 1 + 1 retry
    body = note(fake, "SUBSCRIPTION_PURCHASED")
    response = post(client, body)
    assert response.status_code == 503, response.text
    assert "Receipt Verification Service" in response.json()["error"] and response.headers["Retry-After"]
    assert SECRET not in response.text
    assert log_count(db_url) == 0
    assert post(client, body).json()["result"] == "new"


def test_an_unknown_receipt_is_stored_only_and_the_sandbox_is_asked_when_configured(
    db_url: str, fake: FakeAmazon
) -> None:
    fake.sandbox[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    with client_for(db_url, fake) as c:
        unknown = post(c, note(fake, "SUBSCRIPTION_PURCHASED")).json()
    assert (unknown["kind"], unknown["transitions"]) == ("SUBSCRIPTION_PURCHASED/NOT_FOUND", [])
    with client_for(db_url, fake, rvs_environments=["production", "sandbox"]) as c:
        found = post(c, note(fake, "SUBSCRIPTION_PURCHASED", at=now() + timedelta(seconds=1))).json()
    assert (found["kind"], len(found["transitions"])) == ("SUBSCRIPTION_PURCHASED", 1)
    (_, _, facts) = logged(db_url)[-1]
    (event,) = facts["events"]
    assert event["environment"] == "sandbox" and event["attributes"]["amazon_fetched"]["environment"] == "sandbox"


def test_amazon_settings_errors_name_the_key() -> None:
    base: dict[str, Any] = {"apps": {"a": {"amazon": {}}}}
    cases = [
        ({}, "amazon.shared_secret"),
        ({"shared_secret": " "}, "amazon.shared_secret"),
        ({"shared_secret": "s", "rvs_base_url": "ftp://x"}, "amazon.rvs_base_url"),
        ({"shared_secret": "s", "sns_certificate_hosts": ["evil.example"]}, "amazon.sns_certificate_hosts"),
        ({"shared_secret": "s", "sns_certificate_hosts": ["*.amazonaws.com"]}, "amazon.sns_certificate_hosts"),
        ({"shared_secret": "s", "rvs_environments": ["moon"]}, "amazon.rvs_environments.0"),
        ({"shared_secret": "${AMAZON_NOT_SET_ANYWHERE}"}, "amazon.shared_secret"),
        ({"shared_secret": "s", "surprise": 1}, "amazon.surprise"),
    ]
    for amazon_, key in cases:
        base["apps"]["a"]["amazon"] = amazon_
        with pytest.raises(ConfigError) as raised:
            settings_module.from_dict(base)
        assert raised.value.key == f"apps.a.{key}", raised.value
    with pytest.raises(ConfigError) as raised:
        settings_module.from_dict({"apps": {"a": {"amazon": {"package_name": "p", "shared_secret": "s"}},
                                            "b": {"amazon": {"package_name": "p", "shared_secret": "s"}}}})
    assert raised.value.key == "apps.b.amazon.package_name"


def test_the_shared_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMAZON_SHARED_KEY", "from-env")
    settings = settings_module.from_dict({"apps": {"a": {"amazon": {"shared_secret": "${AMAZON_SHARED_KEY}"}}}})
    amazon = settings.apps["a"].amazon
    assert amazon is not None and amazon.shared_secret == "from-env"
    assert amazon.sns_certificate_hosts == ["sns.*.amazonaws.com", "sns.*.amazonaws.com.cn"]


# --- end to end: SNS → RVS → log → fold → outbox → relay → fake Segment -------------------------


@contextmanager
def pipeline(db_url: str, fake: FakeAmazon) -> Iterator[Pipeline]:
    from fake_segment import FakeSegment

    with FakeSegment(write_keys=(WRITE_KEY, SANDBOX_KEY)) as segment:
        settings = settings_module.from_dict(config(fake, segment.url))
        with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as c:
            yield Pipeline(c, segment, settings, db_url)


def test_a_trial_converts_is_cancelled_and_expires(db_url: str, fake: FakeAmazon) -> None:
    t0 = now() - timedelta(days=40)
    trial_end, paid_end = t0 + timedelta(days=7), t0 + timedelta(days=37)
    with pipeline(db_url, fake) as p:
        fake.receipts[R1] = receipt(R1, t0, renews=trial_end, trial_end=trial_end)
        p.post(PATH, note(fake, "SUBSCRIPTION_PURCHASED", at=t0), TEXT)
        fake.receipts[R1] = receipt(R1, t0, renews=paid_end)
        p.post(PATH, note(fake, "SUBSCRIPTION_CONVERTED_FREE_TRIAL_TO_PAID", at=trial_end), TEXT)
        p.post(PATH, note(fake, "SUBSCRIPTION_RENEWED", at=trial_end + timedelta(seconds=2)), TEXT)  # same period
        fake.receipts[R1] = receipt(R1, t0, cancelled=paid_end, auto_renewing=False)
        p.post(PATH, note(fake, "SUBSCRIPTION_AUTO_RENEWAL_OFF", at=t0 + timedelta(days=20)), TEXT)
        fake.receipts[R1] = receipt(R1, t0, cancelled=paid_end, cancel_reason=1, auto_renewing=False)
        p.post(PATH, note(fake, "SUBSCRIPTION_EXPIRED", at=paid_end), TEXT)
        messages = p.relay()
    received = tracks(messages)
    assert [t["event"] for t in received] == ["rc_trial_started_event", "rc_trial_converted_event",
                                              "rc_cancellation_event", "rc_expiration_event"]
    assert {(t["userId"], t["product_id"], t["store"], t["environment"]) for t in received} == {
        (USER, "fit.monthly", "AMAZON", "PRODUCTION")}
    assert received[1]["transaction_id"] == f"{R1}:{int(paid_end.timestamp() * 1000)}"  # the renewal: a repeat
    assert (received[2]["cancel_reason"], received[3]["expiration_reason"]) == ("UNSUBSCRIBE", "UNSUBSCRIBE")
    assert all(t["revenue"] is None for t in received)  # RVS states no price


def test_an_immediate_tier_change_and_a_refund_stay_on_one_subscription(db_url: str, fake: FakeAmazon) -> None:
    t0 = now() - timedelta(days=10)
    with pipeline(db_url, fake) as p:
        fake.receipts[R1] = receipt(R1, t0, renews=t0 + timedelta(days=30))
        p.post(PATH, note(fake, "SUBSCRIPTION_PURCHASED", at=t0), TEXT)
        t1 = t0 + timedelta(days=5)
        fake.receipts[R1] = receipt(R1, t0, cancelled=t1, cancel_reason=4, auto_renewing=False)
        fake.receipts[R2] = receipt(R2, t1, renews=t1 + timedelta(days=365), term_sku="fit.annual")
        p.post(PATH, note(fake, "SUBSCRIPTION_CANCELLED", R1, at=t1), TEXT)  # the replaced receipt: stored only
        p.post(PATH, note(fake, "SUBSCRIPTION_MODIFIED_IMMEDIATE", R2, at=t1 + timedelta(seconds=1), cancelled=R1),
               TEXT)
        t2 = t1 + timedelta(days=2)
        fake.receipts[R2] = receipt(R2, t1, cancelled=t2, cancel_reason=1, auto_renewing=False, term_sku="fit.annual")
        p.post(PATH, note(fake, "SUBSCRIPTION_CANCELLED", R2, at=t2 + timedelta(seconds=1)), TEXT)
        messages = p.relay()
    received = sorted((m for m in messages if m["type"] == "track"), key=lambda m: m["timestamp"])
    assert [m["event"] for m in received] == ["rc_initial_purchase_event", "rc_product_change_event",
                                              "rc_renewal_event", "rc_cancellation_event", "rc_expiration_event"]
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT key, status FROM subscriptions").fetchall()
    assert rows == [(f"{APP}/amazon/{R1}", "expired")]  # one subscription across both receipts, ended
    assert received[3]["properties"]["cancel_reason"] == "CUSTOMER_SUPPORT"


# --- subledger ingest --format amazon ----------------------------------------------------------


def test_captured_deliveries_replay_with_stored_receipts_or_fetch_now(db_url: str, fake: FakeAmazon) -> None:
    services = build(settings_module.from_dict(config(fake)), database_url=db_url)
    t0 = now() - timedelta(days=3)
    stored = json.loads(note(fake, "SUBSCRIPTION_PURCHASED", at=t0))
    stored["subledger_fetched"] = {"environment": "production",
                                   "receipt": receipt(R1, t0, renews=t0 + timedelta(days=30))}
    fake.receipts[R1] = receipt(R1, t0, cancelled=t0 + timedelta(days=30), auto_renewing=False)
    lines = [json.dumps(stored).encode(), note(fake, "SUBSCRIPTION_AUTO_RENEWAL_OFF", at=t0 + timedelta(days=1)),
             b"{not json", note(fake, "SUBSCRIPTION_RENEWED", "unknown-receipt", at=t0)]
    summary = ingest_stream(services, io.BytesIO(b"\n".join(lines)), "a.ndjson", historical=False, progress=None,
                            fmt="amazon")
    assert (summary.new, summary.rejected, summary.transitions) == (3, 1, 2), summary.rejections
    assert summary.rejections[0].startswith("a.ndjson:3: ")
    assert len(fake.rvs_requests()) == 2  # the two bare lines; the stored line fetched nothing
    kinds = [k for _, k, _ in logged(db_url)]
    assert kinds == ["SUBSCRIPTION_PURCHASED", "SUBSCRIPTION_AUTO_RENEWAL_OFF", "SUBSCRIPTION_RENEWED/NOT_FOUND"]
    again = ingest_stream(services, io.BytesIO(lines[0]), "a.ndjson", historical=False, progress=None, fmt="amazon")
    assert (again.new, again.duplicate) == (0, 1)


# --- the console's payload viewer re-verifies a logged envelope against the kept certificate ---------


def test_the_console_reverifies_a_logged_envelope_against_the_kept_certificate(db_url: str, fake: FakeAmazon) -> None:
    """The webhook keeps the certificate it fetched (sns_certificates); the entry page re-verifies the
    stored envelope with it, offline: verified; with the kept bytes replaced by another key's
    certificate: failed; with none kept: unchecked, and the page fetches nothing."""
    token = "console-token-amazon"
    settings = settings_module.from_dict({**config(fake), "api_token": token})
    fake.receipts[R1] = receipt(R1, now(), renews=now() + timedelta(days=30))
    bearer = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
        assert post(client, note(fake, "SUBSCRIPTION_PURCHASED", version="2")).status_code == 200
        with psycopg.connect(db_url) as conn:
            kept = conn.execute("SELECT url, pem FROM sns_certificates").fetchall()
            position = conn.execute("SELECT position FROM event_log WHERE source = 'amazon'").fetchone()
        assert [(url, bytes(pem)) for url, pem in kept] == [(fake.cert_url(), GOOD.pem)]
        assert position is not None
        fetched = len(fake.requests)

        def state() -> str:
            page = client.get(f"/console/entries/{position[0]}", headers=bearer)
            assert page.status_code == 200, page.text
            found = re.search(r"<strong>Signature: ([a-z ]+)</strong> — ([^\n]*)", page.text)
            assert found is not None, page.text
            return found.group(1)

        assert state() == "verified"
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("UPDATE sns_certificates SET pem = %s", (make_signer().pem,))
        assert state() == "failed"
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DELETE FROM sns_certificates")
        assert state() == "unchecked"
        assert len(fake.requests) == fetched  # the page never reached for the network
