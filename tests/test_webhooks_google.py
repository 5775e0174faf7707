"""POST /webhooks/google and `ingest --format google`: acknowledgement, fetch failures, push tokens,
hostile bodies (4xx, nothing stored), captured bodies with and without stored fetch results."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fake_google import (
    OTHER_KEY,
    PUSH_AUDIENCE,
    PUSH_EMAIL,
    FakeGoogle,
    developer_notification,
    order,
    push_body,
    push_token,
    subscription_v2,
)
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_e2e_google import GOOGLE_APP, MONTHLY, ORDER, T0, google_config
from test_source_google import hostile_pushes
from webhooks_support import log_count, webhook_client, write_root

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.app.stream_ingest import ingest_stream
from subledger.core.errors import ConfigError

PATH = "/webhooks/google"
JSON = {"Content-Type": "application/json"}
TOK = "tok-A"
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
PUSH_AUTH = {"push_audience": PUSH_AUDIENCE, "push_service_account_email": PUSH_EMAIL}


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    with FakeGoogle(hang_seconds=0.8) as fake:
        fake.subscriptions[TOK] = subscription_v2(MONTHLY, T0 + timedelta(days=30), order_id=ORDER)
        fake.orders[ORDER] = order(ORDER, MONTHLY, "9.99")
        yield fake


@contextmanager
def client_for(db_url: str, tmp_path: Path, google: FakeGoogle, **extra: Any) -> Iterator[TestClient]:
    config = google_config(write_root(tmp_path), "http://127.0.0.1:9", google.url, **extra)
    settings_ = settings_module.from_dict(config)
    with TestClient(create_app(build(settings_, database_url=db_url), pool_size=2)) as client:
        yield client


@pytest.fixture
def client(db_url: str, tmp_path: Path, google: FakeGoogle) -> Iterator[TestClient]:
    with client_for(db_url, tmp_path, google) as c:
        yield c


@pytest.fixture
def authed(db_url: str, tmp_path: Path, google: FakeGoogle) -> Iterator[TestClient]:
    with client_for(db_url, tmp_path, google, push_certs_url=google.certs_url, **PUSH_AUTH) as c:
        yield c


def body(kind: int | None, message_id: str = "m-1", token: str = TOK, **extra: Any) -> bytes:
    return push_body(developer_notification(kind, token, T0, **extra), message_id)


def log(db_url: str) -> list[tuple[str, str, dict[str, Any]]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT external_id, kind, facts FROM event_log ORDER BY position").fetchall()
    return [(e, k, f) for e, k, f in rows]


def metric(client: TestClient, resource: str, outcome: str) -> float:
    text = client.get("/metrics").text
    needle = f'subledger_google_fetches_total{{app_id="{GOOGLE_APP}",outcome="{outcome}",resource="{resource}"}}'
    for line in text.splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    return 0.0


# --- acknowledgement and duplicates ------------------------------------------------------------


def test_test_notification_is_acknowledged_stored_only_without_a_fetch(client: TestClient, db_url: str,
                                                                       google: FakeGoogle) -> None:
    response = client.post(PATH, content=body(None, family="test"), headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "new" and response.json()["kind"] == "TEST"
    assert response.json()["transitions"] == []
    assert [(e, k, f["events"]) for e, k, f in log(db_url)] == [("m-1", "TEST", [])]
    assert google.api_requests() == []


def test_unwrapped_push_keyed_by_the_message_id_header(client: TestClient, db_url: str) -> None:
    raw = json.dumps(developer_notification(4, TOK, T0)).encode()
    headers = {**JSON, "x-goog-pubsub-message-id": "42"}
    first = client.post(PATH, content=raw, headers=headers).json()
    again = client.post(PATH, content=raw, headers=headers).json()
    assert (first["id"], first["result"], again["result"]) == ("42", "new", "duplicate")
    assert len(first["transitions"]) == 1 and log_count(db_url) == 1


# --- fetch failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"),
                         [(404, "SUBSCRIPTION_RENEWED/NOT_FOUND"), (410, "SUBSCRIPTION_RENEWED/GONE")])
def test_a_token_google_does_not_know_is_stored_only_with_the_reason(
    client: TestClient, db_url: str, google: FakeGoogle, status: int, kind: str
) -> None:
    google.errors[TOK] = status
    before = metric(client, "subscriptionsv2", {404: "not_found", 410: "gone"}[status])
    response = client.post(PATH, content=body(2), headers=JSON)
    assert response.status_code == 200, response.text
    assert (response.json()["kind"], response.json()["transitions"]) == (kind, [])
    ((_, logged_kind, facts),) = log(db_url)
    assert (logged_kind, facts["events"]) == (kind, [])
    assert metric(client, "subscriptionsv2", {404: "not_found", 410: "gone"}[status]) == before + 1


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_424_and_store_nothing(client: TestClient, db_url: str, google: FakeGoogle,
                                                       status: int) -> None:
    google.errors[TOK] = status
    outcome = {401: "unauthorized", 403: "forbidden"}[status]
    before = metric(client, "subscriptionsv2", outcome)
    response = client.post(PATH, content=body(2), headers=JSON)
    assert response.status_code == 424, response.text
    assert response.json()["field"] == "google.credentials" and str(status) in response.json()["error"]
    assert log_count(db_url) == 0
    assert metric(client, "subscriptionsv2", outcome) == before + 1
    del google.errors[TOK]  # access granted: Pub/Sub's redelivery now goes through
    assert client.post(PATH, content=body(2), headers=JSON).json()["result"] == "new"


def test_a_wrong_access_token_is_424(db_url: str, tmp_path: Path, google: FakeGoogle) -> None:
    with client_for(db_url, tmp_path, google, access_token="stale") as c:
        assert c.post(PATH, content=body(2), headers=JSON).status_code == 424
    assert log_count(db_url) == 0


def test_a_service_account_key_is_exchanged_for_a_token(db_url: str, tmp_path: Path, google: FakeGoogle) -> None:
    key = tmp_path / "play-sa.json"
    key.write_text(json.dumps(google.service_account_key()))
    config = google_config(write_root(tmp_path), "http://127.0.0.1:9", google.url, service_account_file=str(key))
    del config["apps"][GOOGLE_APP]["google"]["access_token"]
    with TestClient(create_app(build(settings_module.from_dict(config), database_url=db_url), pool_size=2)) as c:
        first = c.post(PATH, content=body(2), headers=JSON)
        assert first.status_code == 200, first.text
        assert c.post(PATH, content=body(2, "m-2"), headers=JSON).json()["result"] == "new"
    assert google.requests.count("/token") == 1  # the token is reused until it expires


def test_server_errors_are_retried(client: TestClient, db_url: str, google: FakeGoogle) -> None:
    google.faults.extend([503, 500])
    before = metric(client, "subscriptionsv2", "retried")
    response = client.post(PATH, content=body(2), headers=JSON)
    assert response.status_code == 200 and response.json()["result"] == "new"
    assert metric(client, "subscriptionsv2", "retried") == before + 2


@pytest.mark.parametrize("fault", [503, 429, "hang"])
def test_google_unavailable_is_503_and_a_redelivery_succeeds(client: TestClient, db_url: str, google: FakeGoogle,
                                                             fault: int | str) -> None:
    google.faults.extend([fault] * 3)  # 1 + 2 retries
    response = client.post(PATH, content=body(2), headers=JSON)
    assert response.status_code == 503, response.text
    assert "Play Developer API" in response.json()["error"] and int(response.headers["Retry-After"]) >= 1
    assert log_count(db_url) == 0
    assert client.post(PATH, content=body(2), headers=JSON).json()["result"] == "new"


def test_a_refused_order_loses_only_the_money(client: TestClient, db_url: str, google: FakeGoogle) -> None:
    google.errors[ORDER] = 403
    response = client.post(PATH, content=body(2), headers=JSON)
    assert response.status_code == 200 and len(response.json()["transitions"]) == 1
    ((_, _, facts),) = log(db_url)
    (event,) = facts["events"]
    assert event["attributes"]["google_fetched"]["order_error"].startswith("403: ")
    assert (event["price"], event["attributes"]["price_source"]) == ("9.99", "recurring_price")


# --- routing and push authentication -----------------------------------------------------------


def test_an_unknown_package_is_404(client: TestClient, db_url: str) -> None:
    response = client.post(PATH, content=body(2, package="com.other.app"), headers=JSON)
    assert response.status_code == 404 and response.json()["field"] == "packageName"
    assert log_count(db_url) == 0


def test_no_google_app_configured_is_404(db_url: str, tmp_path: Path) -> None:
    with webhook_client(db_url, write_root(tmp_path)) as c:
        assert c.post(PATH, content=body(2), headers=JSON).status_code == 404
    assert log_count(db_url) == 0


def test_a_valid_push_token_is_accepted(authed: TestClient, db_url: str) -> None:
    headers = {**JSON, "Authorization": f"Bearer {push_token()}"}
    assert authed.post(PATH, content=body(2), headers=headers).json()["result"] == "new"


BAD_TOKENS = {
    "missing": None,
    "not bearer": "Basic abc",
    "garbage": "Bearer not.a.jwt",
    "other key": f"Bearer {push_token(key=OTHER_KEY)}",
    "other audience": f"Bearer {push_token(audience='https://elsewhere.example/push')}",
    "other account": f"Bearer {push_token(email='intruder@example.iam.gserviceaccount.com')}",
    "unverified email": f"Bearer {push_token(verified=False)}",
    "expired": f"Bearer {push_token(expires_in=-3600)}",
    "other issuer": f"Bearer {push_token(issuer='https://evil.example')}",
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
def test_bad_push_tokens_are_401_and_store_nothing(authed: TestClient, db_url: str, google: FakeGoogle,
                                                   name: str) -> None:
    token = BAD_TOKENS[name]
    headers = {**JSON, **({"Authorization": token} if token else {})}
    response = authed.post(PATH, content=body(2), headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["field"] == "Authorization"
    assert log_count(db_url) == 0 and google.api_requests() == []


@settings(max_examples=200, deadline=None, suppress_health_check=HEALTH)
@given(hostile_pushes(), st.sampled_from(["good", "bad", "none"]))
def test_hostile_bodies_and_tokens_are_4xx_and_store_nothing(authed: TestClient, db_url: str, raw: bytes,
                                                             token: str) -> None:
    headers = dict(JSON)
    if token != "none":
        headers["Authorization"] = f"Bearer {push_token() if token == 'good' else push_token(key=OTHER_KEY)}"
    before = log_count(db_url)
    response = authed.post(PATH, content=raw, headers=headers)
    assert response.status_code < 500, response.text
    if token != "good" or response.status_code >= 400:
        assert 400 <= response.status_code < 500, response.text
        assert log_count(db_url) == before
    else:
        assert response.json()["result"] in ("new", "duplicate")


# --- configuration -----------------------------------------------------------------------------


def test_google_settings_errors_name_the_key(tmp_path: Path) -> None:
    base = {"apps": {"a": {"google": {}}}}
    cases = [
        ({"access_token": "t", "service_account_file": str(tmp_path / "key.json")}, "google"),
        ({"service_account_file": str(tmp_path / "missing.json")}, "google.service_account_file"),
        ({"push_service_account_email": PUSH_EMAIL}, "google"),
        ({"api_base_url": "ftp://x"}, "google.api_base_url"),
        ({"surprise": 1}, "google.surprise"),
    ]
    (tmp_path / "key.json").write_text("{}")
    for google_, key in cases:
        base["apps"]["a"]["google"] = google_
        with pytest.raises(ConfigError) as raised:
            settings_module.from_dict(base)
        assert raised.value.key == f"apps.a.{key}", raised.value
    with pytest.raises(ConfigError) as raised:
        settings_module.from_dict({"apps": {"a": {"google": {"package_name": "p"}},
                                            "b": {"google": {"package_name": "p"}}}})
    assert raised.value.key == "apps.b.google.package_name"


# --- subledger ingest --format google ----------------------------------------------------------


def test_captured_pushes_replay_with_stored_results_or_fetch_now(db_url: str, tmp_path: Path,
                                                                 google: FakeGoogle) -> None:
    services = build(settings_module.from_dict(google_config(write_root(tmp_path), "http://127.0.0.1:9", google.url)),
                     database_url=db_url)
    stored = json.loads(body(4, "m-1"))
    stored["subledger_fetched"] = {
        "subscriptionsv2": subscription_v2(MONTHLY, T0 + timedelta(days=30), order_id="GPA.1", phase="freeTrial"),
        "order": order("GPA.1", MONTHLY, "0", phase="freeTrial"),
    }
    lines = [json.dumps(stored).encode(), body(2, "m-2"), b"{not json", body(2, "m-3")]
    summary = ingest_stream(services, io.BytesIO(b"\n".join(lines)), "g.ndjson", historical=False, progress=None,
                            fmt="google")
    assert (summary.new, summary.rejected, summary.transitions) == (3, 1, 2)
    assert summary.rejections[0].startswith("g.ndjson:3: ")
    subscription_fetches = [r for r in google.api_requests() if "/subscriptionsv2/" in r]
    assert len(subscription_fetches) == 2  # the two bare lines; the stored line fetched nothing
    assert not any(r.endswith("/orders/GPA.1") for r in google.api_requests())
    with psycopg.connect(db_url) as conn:
        raws = [bytes(r) for (r,) in conn.execute("SELECT raw FROM event_log ORDER BY position")]
        kinds = [k for (k,) in conn.execute("SELECT kind FROM transitions ORDER BY log_position")]
    assert raws == [lines[0], lines[1], lines[3]]
    assert kinds == ["trial_started", "trial_converted"]
    again = ingest_stream(services, io.BytesIO(lines[0]), "g.ndjson", historical=False, progress=None, fmt="google")
    assert (again.new, again.duplicate) == (0, 1)
