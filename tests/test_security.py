"""Every route of the OpenAPI document refuses a request without credentials.

`/v1/...` answers 401 (missing, wrong or non-bearer token) and stores nothing; `/webhooks/...`
answers the source's own refusal (bad or missing signature / authorization). Only the health
routes and the API documentation are open. A route added later is walked automatically.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from apple_signing import APP_APPLE_ID
from fastapi.testclient import TestClient
from webhooks_support import APPLE_APP, RC_APP, STRIPE_APP, config_dict, write_root

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app

OPEN = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"}
TOKEN = "the-real-token"
BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer "},
    {"Authorization": f"bearer {TOKEN}x"},
]
STORED = ("event_log", "duplicate_receipts", "subscriptions", "transitions", "outbox", "identity_links",
          "destination_state")


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    root = write_root(tmp_path)
    base = config_dict(root)
    base["apps"][GOOGLE_APP] = {"google": {"access_token": "t", "api_base_url": "http://127.0.0.1:9",
                                           "push_audience": "https://subledger.example/webhooks/google"}}
    base["apps"][AMAZON_APP] = {"amazon": {"package_name": AMAZON_APP, "shared_secret": "s",
                                           "rvs_base_url": "http://127.0.0.1:9"}}
    config = settings_module.from_dict({**base, "api_token": TOKEN})
    with TestClient(create_app(build(config, database_url=db_url), pool_size=2)) as c:
        yield c


def _b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# Well-formed, addressed to the configured app, but signed by nobody Apple's root vouches for.
FORGED_APPLE = json.dumps({"signedPayload": ".".join((
    _b64({"alg": "ES256", "x5c": ["AAAA", "BBBB", "CCCC"]}),
    _b64({"notificationType": "SUBSCRIBED", "notificationUUID": "forged-1",
          "data": {"bundleId": APPLE_APP, "appAppleId": APP_APPLE_ID, "environment": "Production"}}),
    "c2lnbmF0dXJl",
))}).encode()
GOOGLE_APP = "com.example.fitness.play"
# A Pub/Sub push for a configured package, without the OIDC token Pub/Sub signs.
UNSIGNED_PUSH = json.dumps({"message": {"messageId": "1", "attributes": {}, "data": base64.b64encode(json.dumps({
    "version": "1.0", "packageName": GOOGLE_APP, "eventTimeMillis": "1764300000000",
    "subscriptionNotification": {"version": "1.0", "notificationType": 4, "purchaseToken": "t", "subscriptionId": "s"},
}).encode()).decode()}, "subscription": "projects/p/subscriptions/s"}).encode()
UNSIGNED = json.dumps({"id": "evt_1", "type": "customer.subscription.created", "event": {"id": "e1"}}).encode()
AMAZON_APP = "com.example.fitness.amazon"
# An SNS notification for a configured Amazon app, signed by nobody: its certificate is not on Amazon's host.
FORGED_SNS = json.dumps({
    "Type": "Notification", "MessageId": "m-1", "TopicArn": "arn:aws:sns:us-east-1:1:rtn",
    "Message": json.dumps({"appPackageName": AMAZON_APP, "notificationType": "SUBSCRIPTION_PURCHASED",
                           "appUserId": "u", "receiptId": "r", "timestamp": 1764300000000}),
    "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "SignatureVersion": "1", "Signature": "AAAA",
    "SigningCertURL": "https://sns.us-east-1.amazonaws.com.attacker.example/cert.pem",
}).encode()


def routes(client: TestClient) -> list[tuple[str, str]]:
    document = client.app.openapi()  # type: ignore[attr-defined]
    return [(method.upper(), path) for path, item in document["paths"].items() for method in item]


def concrete(path: str) -> str:
    """Fill path parameters: a configured app for webhooks (so the source's check is what refuses)."""
    app = STRIPE_APP if "/stripe/" in path else RC_APP if "/revenuecat/" in path else "x"
    return re.sub(r"\{app_id\}", app, re.sub(r"\{(?!app_id)[^}]+\}", "x", path))


def stored(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in STORED}  # type: ignore[index]


def test_every_route_refuses_requests_without_credentials(client: TestClient, db_url: str) -> None:
    walked = routes(client)
    paths = {p for _, p in walked}
    # the walk covers the API, not an empty document
    assert {"/v1/events", "/v1/audit/stats", "/v1/outbox", "/v1/subscribers/{app_user_id}/links"} <= paths
    assert any(p.startswith("/webhooks/") for p in paths)
    before = stored(db_url)
    for method, path in walked:
        if path in OPEN:
            continue
        assert path.startswith(("/v1/", "/webhooks/")), f"{path}: a route outside /v1 and /webhooks"
        url = concrete(path)
        if path.startswith("/webhooks/"):
            body = (FORGED_APPLE if "/apple" in path else UNSIGNED_PUSH if "/google" in path
                    else FORGED_SNS if "/amazon" in path else UNSIGNED)
            response = client.request(method, url, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 401, f"{method} {path}: {response.status_code} {response.text}"
            continue
        for headers in BAD_CREDENTIALS:
            response = client.request(method, url, headers=headers)
            assert response.status_code == 401, f"{method} {path} {headers}: {response.status_code} {response.text}"
            assert response.headers.get("www-authenticate") == "Bearer"
            assert "error" in response.json()
        # a JSON body does not get a request past the token check either
        with_body = client.request(method, url, json={"app_id": "x", "subscription_id": "1", "store": "other"})
        assert with_body.status_code == 401, f"{method} {path}: {with_body.status_code}"
    assert stored(db_url) == before


def test_open_routes_stay_open(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_no_token_configured_refuses_everything(db_url: str) -> None:
    config = settings_module.from_dict({"apps": {"com.example": {}}})
    with TestClient(create_app(build(config, database_url=db_url), pool_size=1)) as c:
        for method, path in routes(c):
            if path.startswith("/v1/"):
                response = c.request(method, concrete(path), headers={"Authorization": "Bearer "})
                assert response.status_code == 401 and "SUBLEDGER_API_TOKEN" in response.json()["error"]
