"""The webhook endpoints: accepted and duplicate deliveries, every refusal a 4xx naming why, nothing stored."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from apple_signing import (
    APP_APPLE_ID,
    body,
    make_ca,
    notification,
    notification_payload,
    sign,
    tamper,
    transaction,
)
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_source_apple import _hostile_signed
from test_source_apple import json_values as apple_json
from test_source_revenuecat import hostile_bodies as rc_hostile
from test_source_revenuecat import rc_event
from test_source_stripe import charge, event, hostile_events, invoice, subscription
from webhooks_support import (
    APPLE_APP,
    CA,
    OTHER_APP,
    RC_APP,
    RC_AUTH,
    STRIPE_APP,
    STRIPE_SECRET,
    config_dict,
    log_count,
    log_rows,
    rc_body,
    rc_headers,
    stripe_headers,
    webhook_client,
    write_root,
)

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.app.sources import build_sources
from subledger.core.errors import ConfigError

OTHER_CA = make_ca(name="Impostor")
JSON = {"Content-Type": "application/json"}
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_root(tmp_path_factory.mktemp("apple"))


@pytest.fixture
def client(db_url: str, root: Path) -> Iterator[TestClient]:
    with webhook_client(db_url, root) as c:
        yield c


def refused(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    data: dict[str, Any] = response.json()
    assert data["error"]
    if field is not None:
        assert data.get("field") == field, data
    return data


# --- configuration -----------------------------------------------------------------------------


def test_source_settings_errors_name_the_key(root: Path, tmp_path: Path) -> None:
    base = config_dict(root)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"root_certificates": [str(tmp_path / "missing.cer")]}, f'apps."{APPLE_APP}".apple.root_certificates'),
        ({"app_apple_id": None}, f'apps."{APPLE_APP}".apple'),
        ({"environments": ["Xcode"]}, f'apps."{APPLE_APP}".apple.environments.0'),
        ({"bundle_id": ""}, f'apps."{APPLE_APP}".apple.bundle_id'),
    ]
    for change, key in cases:
        data = json.loads(json.dumps(base))
        data["apps"][APPLE_APP]["apple"].update(change)
        with pytest.raises(ConfigError) as err:
            settings_module.from_dict(data)
        assert err.value.key == key, err.value
    data = json.loads(json.dumps(base))
    data["apps"][STRIPE_APP]["stripe"] = {"endpoint_secrets": []}
    with pytest.raises(ConfigError, match="endpoint_secrets"):
        settings_module.from_dict(data)
    data["apps"][STRIPE_APP]["stripe"] = {"endpoint_secrets": "${SUBLEDGER_TEST_UNSET_SECRET}"}
    with pytest.raises(ConfigError, match="SUBLEDGER_TEST_UNSET_SECRET"):
        settings_module.from_dict(data)


def test_pem_roots_and_single_secret_are_accepted(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = tmp_path / "root.pem"
    pem.write_bytes(CA.root.public_bytes(Encoding.PEM))
    monkeypatch.setenv("SUBLEDGER_TEST_SECRET", "whsec_from_env")
    data = config_dict(pem)
    data["apps"][STRIPE_APP]["stripe"] = {"endpoint_secrets": "${SUBLEDGER_TEST_SECRET}", "tolerance_seconds": 0}
    sources = build_sources(settings_module.from_dict(data))
    assert sources.apple[APPLE_APP].config.root_certificates == (CA.root_der,)
    assert sources.stripe[STRIPE_APP].endpoint_secrets == ("whsec_from_env",)
    assert sources.stripe[STRIPE_APP].tolerance == 0


def test_two_apps_with_one_bundle_id_are_refused_at_start(root: Path) -> None:
    data = config_dict(root)
    data["apps"][OTHER_APP]["apple"] = {"bundle_id": APPLE_APP, "root_certificates": [str(root)],
                                        "app_apple_id": 1}
    with pytest.raises(ConfigError) as err:
        build_sources(settings_module.from_dict(data))
    assert err.value.key == f'apps."{OTHER_APP}".apple.bundle_id'


# --- Apple -------------------------------------------------------------------------------------


def test_apple_accepted_then_duplicate_one_row_raw_verbatim(client: TestClient, db_url: str) -> None:
    raw = notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=transaction(trial=True), notification_uuid="n-1")
    first = client.post("/webhooks/apple", content=raw, headers=JSON)
    assert first.status_code == 200, first.text
    assert first.json()["result"] == "new" and first.json()["kind"] == "SUBSCRIBED/INITIAL_BUY"
    assert len(first.json()["transitions"]) == 1
    again = client.post("/webhooks/apple", content=raw, headers=JSON)
    assert again.status_code == 200 and again.json()["result"] == "duplicate"
    assert log_rows(db_url) == [("apple", "n-1", raw)]


def test_apple_test_notification_is_acknowledged_and_stored_only(client: TestClient, db_url: str) -> None:
    response = client.post("/webhooks/apple", content=notification(CA, "TEST"), headers=JSON)
    assert response.status_code == 200 and response.json()["transitions"] == []
    assert log_count(db_url) == 1


APPLE_REFUSALS: list[tuple[Any, int, str | None]] = [
        (lambda: body(tamper(sign(notification_payload(CA, "DID_RENEW", txn=transaction()), CA),
                             notificationType="REFUND")), 401, "signedPayload"),
        (lambda: body(sign(notification_payload(CA, "TEST"), CA, x5c=False)), 401, "signedPayload"),
        (lambda: notification(OTHER_CA, "TEST"), 401, "signedPayload"),
        (lambda: notification(CA, "TEST", bundle_id="com.example.other"), 403, "bundleId"),
        (lambda: notification(CA, "TEST", environment="Production", app_apple_id=APP_APPLE_ID + 1), 403,
         "appAppleId"),
        (lambda: notification(CA, "DID_RENEW", txn=transaction(environment="Production")), 403, "environment"),
        (lambda: notification(CA, "DID_RENEW", txn=transaction(bundle_id="com.example.other")), 403, "bundleId"),
        (lambda: b"not json", 400, None),
        (lambda: b'{"signedPayload": "a.b"}', 400, "signedPayload"),
        (lambda: b"", 400, None),
]


def test_apple_refusals(client: TestClient, db_url: str) -> None:
    """Tampered, no x5c, another root, wrong bundle / app / environment, malformed: each named."""
    for make, status, field in APPLE_REFUSALS:
        refused(client.post("/webhooks/apple", content=make(), headers=JSON), status, field)
    assert log_count(db_url) == 0


def test_status_codes_per_refusal() -> None:
    from subledger.app.http.webhooks import status_for
    from subledger.app.sources import UnknownApp
    from subledger.core.errors import BadSignature, InvalidEvent, MalformedPayload, SignatureUncheckable

    assert status_for(SignatureUncheckable("online certificate (OCSP) check could not complete; transient", "x")) == 503
    assert status_for(BadSignature("does not verify", "signedPayload")) == 401
    assert status_for(BadSignature("other bundle", "bundleId")) == 403
    assert status_for(MalformedPayload("not JSON")) == 400
    assert status_for(InvalidEvent("is required", "id")) == 422
    assert status_for(UnknownApp("no such app", "app_id")) == 404


def test_every_transient_refusal_is_a_503_with_retry_after() -> None:
    """One rule for every source: Apple's OCSP out of reach, a store API down: 503 and Retry-After;
    a refusal the sender cannot cure by waiting carries no Retry-After."""
    from subledger.app.http.webhooks import refusal
    from subledger.core.errors import BadSignature, SignatureUncheckable, SourceUnavailable

    for exc in (SignatureUncheckable("online certificate (OCSP) check could not complete; transient", "x"),
                SourceUnavailable("the Play Developer API did not answer")):
        answer = refusal(exc)
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1, exc
    assert "retry-after" not in refusal(BadSignature("does not verify", "signedPayload")).headers


def test_apple_environment_not_accepted_is_403(db_url: str, root: Path) -> None:
    data = config_dict(root)
    data["apps"][APPLE_APP]["apple"]["environments"] = ["Sandbox"]
    app = create_app(build(settings_module.from_dict(data), database_url=db_url), pool_size=1)
    with TestClient(app) as c:
        raw = notification(CA, "TEST", environment="Production")
        refused(c.post("/webhooks/apple", content=raw, headers=JSON), 403, "environment")
    assert log_count(db_url) == 0


def test_apple_routes_by_bundle_id_to_each_apps_own_root(db_url: str, root: Path, tmp_path: Path) -> None:
    other_root = tmp_path / "other.cer"
    other_root.write_bytes(OTHER_CA.root_der)
    data = config_dict(root)
    data["apps"][OTHER_APP]["apple"] = {"bundle_id": "com.example.second", "root_certificates": [str(other_root)],
                                        "app_apple_id": 42}
    with TestClient(create_app(build(settings_module.from_dict(data), database_url=db_url), pool_size=1)) as c:
        second = notification(OTHER_CA, "TEST", bundle_id="com.example.second", app_apple_id=42)
        assert c.post("/webhooks/apple", content=second, headers=JSON).status_code == 200
        # the first app's chain does not verify for the second app, and the reverse
        crossed = notification(CA, "TEST", bundle_id="com.example.second", app_apple_id=42)
        refused(c.post("/webhooks/apple", content=crossed, headers=JSON), 401)
        assert c.post("/webhooks/apple", content=notification(CA, "TEST"), headers=JSON).status_code == 200
    with psycopg.connect(db_url) as conn:
        apps = [a for (a,) in conn.execute("SELECT app_id FROM event_log ORDER BY position")]
    assert apps == [OTHER_APP, APPLE_APP]


def test_apple_with_no_app_configured_is_404(db_url: str) -> None:
    settings = settings_module.from_dict({"apps": {OTHER_APP: {}}})
    with TestClient(create_app(build(settings, database_url=db_url), pool_size=1)) as c:
        refused(c.post("/webhooks/apple", content=notification(CA, "TEST"), headers=JSON), 404)


# --- Stripe ------------------------------------------------------------------------------------

TRIAL_START = json.dumps(event("customer.subscription.created", subscription(status="trialing"))).encode()


def stripe_post(client: TestClient, raw: bytes, app: str = STRIPE_APP, **kw: Any) -> Any:
    return client.post(f"/webhooks/stripe/{app}", content=raw, headers=stripe_headers(raw, **kw))


def test_stripe_accepted_then_duplicate(client: TestClient, db_url: str) -> None:
    raw = json.dumps(event("invoice.paid", invoice(), event_id="evt_renew")).encode()
    first = stripe_post(client, raw)
    assert first.status_code == 200, first.text
    assert first.json()["result"] == "new" and first.json()["id"] == "evt_renew"
    assert stripe_post(client, raw).json()["result"] == "duplicate"
    assert log_rows(db_url) == [("stripe", "evt_renew", raw)]


def test_stripe_bad_signatures(client: TestClient, db_url: str) -> None:
    raw = TRIAL_START
    for headers in (
        {},
        {"Stripe-Signature": "garbage"},
        stripe_headers(raw, secret="whsec_wrong"),
        stripe_headers(raw, at=int(time.time()) - 301),
        stripe_headers(raw.replace(b"trialing", b"active")),
    ):
        response = client.post(f"/webhooks/stripe/{STRIPE_APP}", content=raw, headers=headers)
        refused(response, 401, "Stripe-Signature")
    assert log_count(db_url) == 0


def test_stripe_unknown_or_unconfigured_app_is_404(client: TestClient, db_url: str) -> None:
    refused(stripe_post(client, TRIAL_START, app="com.nobody"), 404, "app_id")
    refused(stripe_post(client, TRIAL_START, app=OTHER_APP), 404, "app_id")
    # another app's endpoint secret does not open this app's endpoint
    refused(stripe_post(client, TRIAL_START, app=STRIPE_APP, secret=RC_AUTH), 401)
    assert log_count(db_url) == 0


def test_stripe_signed_but_malformed(client: TestClient, db_url: str) -> None:
    for raw, status in [
        (b"not json", 400),
        (b"[]", 400),
        (b'{"object": "event", "type": "x", "created": 1, "data": {"object": {}}}', 422),
        (b'{"object": "event", "id": "e", "type": "invoice.paid", "created": 1, "data": {}}', 400),
    ]:
        refused(stripe_post(client, raw), status)
    not_utf8 = {"Stripe-Signature": f"t={int(time.time())},v1=00"}
    refused(client.post(f"/webhooks/stripe/{STRIPE_APP}", content=b"\xff\xfe", headers=not_utf8), 400)
    assert log_count(db_url) == 0


def test_stripe_refund_links_to_the_invoice_in_the_log(client: TestClient, db_url: str) -> None:
    orphan = json.dumps(event("charge.refunded", charge(invoice_ref="in_unknown"), event_id="evt_orphan")).encode()
    assert stripe_post(client, orphan).json()["transitions"] == []  # stored only: nothing to link to
    paid = json.dumps(event("invoice.paid", invoice(invoice_id="in_1RKxFitness0002"), event_id="evt_paid")).encode()
    assert stripe_post(client, paid).status_code == 200
    refund = json.dumps(event("charge.refunded", charge(), event_id="evt_refund")).encode()
    response = stripe_post(client, refund)
    assert response.status_code == 200 and len(response.json()["transitions"]) == 1
    with psycopg.connect(db_url) as conn:
        facts = conn.execute("SELECT facts FROM event_log WHERE external_id = 'evt_refund'").fetchone()
    assert facts is not None
    (fact,) = facts[0]["events"]
    assert (fact["type"], fact["subscription_id"], fact["price"]) == ("refund", "sub_1RKxTrialFitness01", "-9.99")


def invoice_payment_paid(invoice_id: str, payment_intent: str, event_id: str) -> dict[str, Any]:
    """Basil's link between a payment intent and the invoice it paid (`invoice_payment.paid`)."""
    obj = {"id": "inpay_1RKxFitness0001", "object": "invoice_payment", "amount_paid": 999, "amount_requested": 999,
           "currency": "usd", "invoice": invoice_id, "is_default": True, "livemode": True,
           "payment": {"type": "payment_intent", "payment_intent": payment_intent}, "status": "paid"}
    return event("invoice_payment.paid", obj, event_id=event_id)


def test_basil_refund_links_through_the_logged_invoice_payment(client: TestClient, db_url: str) -> None:
    paid = json.dumps(event("invoice.paid", invoice(invoice_id="in_basil"), event_id="evt_paid")).encode()
    link = json.dumps(invoice_payment_paid("in_basil", "pi_3RKxFitness0001", "evt_link")).encode()
    refund = json.dumps(event("charge.refunded", charge(invoice_ref=None), event_id="evt_refund")).encode()
    assert stripe_post(client, paid).status_code == 200
    assert stripe_post(client, link).json()["transitions"] == []  # stored only
    response = stripe_post(client, refund)
    assert response.status_code == 200 and len(response.json()["transitions"]) == 1
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT facts FROM event_log WHERE external_id = 'evt_refund'").fetchone()
    assert row is not None
    assert row[0]["events"][0]["subscription_id"] == "sub_1RKxTrialFitness01"


# --- RevenueCat --------------------------------------------------------------------------------


def test_revenuecat_accepted_then_duplicate(client: TestClient, db_url: str) -> None:
    raw = rc_body(rc_event("RENEWAL"))
    first = client.post(f"/webhooks/revenuecat/{RC_APP}", content=raw, headers=rc_headers())
    assert first.status_code == 200 and first.json()["result"] == "new"
    again = client.post(f"/webhooks/revenuecat/{RC_APP}", content=raw, headers=rc_headers())
    assert again.json()["result"] == "duplicate"
    assert [(s, r) for s, _, r in log_rows(db_url)] == [("revenuecat", raw)]


RC_REFUSALS: list[tuple[str, dict[str, str], bytes, int, str | None]] = [
        (RC_APP, {}, rc_body(rc_event("RENEWAL")), 401, "Authorization"),
        (RC_APP, rc_headers("Bearer wrong"), rc_body(rc_event("RENEWAL")), 401, "Authorization"),
        (RC_APP, rc_headers(RC_AUTH + " "), rc_body(rc_event("RENEWAL")), 401, "Authorization"),
        ("com.nobody", rc_headers(), rc_body(rc_event("RENEWAL")), 404, "app_id"),
        (OTHER_APP, rc_headers(), rc_body(rc_event("RENEWAL")), 404, "app_id"),
        (RC_APP, rc_headers(), b"{not json", 400, None),
        (RC_APP, rc_headers(), b'{"event": []}', 400, "event"),
        (RC_APP, rc_headers(), rc_body(rc_event("RENEWAL", id="")), 422, "event.id"),
        (RC_APP, rc_headers(), rc_body(rc_event("RENEWAL", purchased_at_ms="soon")), 422,
         "event.purchased_at_ms"),
]


def test_revenuecat_refusals(client: TestClient, db_url: str) -> None:
    for app, headers, raw, status, field in RC_REFUSALS:
        refused(client.post(f"/webhooks/revenuecat/{app}", content=raw, headers=headers), status, field)
    assert log_count(db_url) == 0


def test_odd_reason_types_are_mapped_not_a_500(client: TestClient, db_url: str) -> None:
    # found by the hostile-body property: a list where RevenueCat sends a string
    raw = rc_body(rc_event("EXPIRATION", expiration_reason=[None]))
    assert client.post(f"/webhooks/revenuecat/{RC_APP}", content=raw, headers=rc_headers()).status_code == 200


def test_an_adapter_bug_is_a_500_with_an_error_id_and_its_traceback_logged(
    client: TestClient, db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10: a bug is a server error, never a 4xx: a 4xx tells the store to give up the delivery
    (it would be lost), a 5xx makes it deliver again once the bug is fixed."""
    from subledger.core.sources import revenuecat

    def broken(*_: Any) -> Any:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(revenuecat, "parse_webhook", broken)
    caplog.set_level(logging.ERROR, logger="subledger.http")
    answering = TestClient(client.app, raise_server_exceptions=False)  # the app's pool is already open
    response = answering.post(f"/webhooks/revenuecat/{RC_APP}", content=rc_body(rc_event("RENEWAL")),
                              headers=rc_headers())
    body = refused(response, 500)
    assert body == {"error": "internal error", "error_id": body["error_id"]} and body["error_id"]
    assert "unhashable" not in response.text
    logged = [r for r in caplog.records if body["error_id"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None and logged[0].exc_info[0] is TypeError
    assert log_count(db_url) == 0


# --- size limit --------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_413(client: TestClient, db_url: str) -> None:
    big = b'{"pad": "' + b"x" * 1_000_001 + b'"}'
    headers = {**rc_headers(), **stripe_headers(big)}
    for path in ("/webhooks/apple", f"/webhooks/stripe/{STRIPE_APP}", f"/webhooks/revenuecat/{RC_APP}"):
        refused(client.post(path, content=big, headers=headers), 413)
    assert log_count(db_url) == 0


# --- hostile input: 200 bodies per endpoint -----------------------------------------------------


@st.composite
def apple_hostile(draw: Any) -> tuple[bytes, bool]:
    """(body, must be refused): junk and untrusted signatures must be; signed odd claims may be stored."""
    choice = draw(st.integers(min_value=0, max_value=6))
    if choice == 0:
        return bytes(draw(st.binary(max_size=200))), True
    if choice == 1:
        return json.dumps(draw(apple_json)).encode(), True
    if choice == 2:
        return json.dumps({"signedPayload": draw(st.text(max_size=200))}).encode(), True
    if choice == 3:
        payload = notification_payload(OTHER_CA, draw(st.sampled_from(["TEST", "DID_RENEW", "REFUND"])),
                                       txn=transaction())
        return body(sign(payload, OTHER_CA)), True
    if choice == 4:
        signed = sign(notification_payload(CA, "DID_RENEW", txn=transaction()), CA)
        return body(tamper(signed, **{draw(st.sampled_from(["notificationType", "signedDate", "data"])):
                                      draw(apple_json)})), True
    if choice == 5:
        signed = sign(notification_payload(CA, "TEST"), CA, x5c=draw(st.sampled_from([False, CA.x5c[:2],
                                                                                     OTHER_CA.x5c])))
        return body(signed), True
    return _hostile_signed(CA, draw), False


@settings(max_examples=200, deadline=None, suppress_health_check=HEALTH)
@given(apple_hostile())
def test_apple_hostile_bodies_are_4xx_and_store_nothing(client: TestClient, db_url: str,
                                                        case: tuple[bytes, bool]) -> None:
    raw, must_refuse = case
    before = log_count(db_url)
    response = client.post("/webhooks/apple", content=raw, headers=JSON)
    assert response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    if must_refuse or response.status_code >= 400:
        assert 400 <= response.status_code < 500, response.text
        assert log_count(db_url) == before
    else:
        assert response.json()["result"] in ("new", "duplicate")


@settings(max_examples=200, deadline=None, suppress_health_check=HEALTH)
@given(hostile_events(), st.sampled_from(["sign", "wrong", "garbage", "none"]))
def test_stripe_hostile_bodies_are_4xx_and_store_nothing(client: TestClient, db_url: str, raw: bytes,
                                                         header_kind: str) -> None:
    headers = {
        "sign": stripe_headers(raw) if _utf8(raw) else {"Stripe-Signature": "t=1,v1=00"},
        "wrong": stripe_headers(raw, secret="whsec_other") if _utf8(raw) else {},
        "garbage": {"Stripe-Signature": "t=,v1=,="},
        "none": {},
    }[header_kind]
    before = log_count(db_url)
    response = client.post(f"/webhooks/stripe/{STRIPE_APP}", content=raw, headers=headers)
    assert response.status_code < 500, response.text
    if header_kind != "sign" or response.status_code >= 400:
        assert 400 <= response.status_code < 500, response.text
        assert log_count(db_url) == before
    else:
        assert response.json()["result"] in ("new", "duplicate")


@settings(max_examples=200, deadline=None, suppress_health_check=HEALTH)
@given(rc_hostile(), st.sampled_from([RC_AUTH, "Bearer wrong", None]))
def test_revenuecat_hostile_bodies_are_4xx_and_store_nothing(client: TestClient, db_url: str, raw: bytes,
                                                             auth: str | None) -> None:
    headers = rc_headers(auth) if auth is not None else JSON
    before = log_count(db_url)
    response = client.post(f"/webhooks/revenuecat/{RC_APP}", content=raw, headers=headers)
    assert response.status_code < 500, response.text
    if auth != RC_AUTH or response.status_code >= 400:
        assert 400 <= response.status_code < 500, response.text
        assert log_count(db_url) == before
    else:
        assert response.json()["result"] in ("new", "duplicate")


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_secrets_are_not_echoed(client: TestClient) -> None:
    response = client.post(f"/webhooks/revenuecat/{RC_APP}", content=b"{}", headers=rc_headers("Bearer guess"))
    assert RC_AUTH not in response.text and STRIPE_SECRET not in response.text
