"""Identity links: later messages go to the linked user, with an identify listing the ids it had before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.outbox.replay import replay
from subledger.store import audit

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
APP = "com.example"
TOKEN = "id-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = f"{APP}/app_store/1000001"


def event(eid: str, kind: str, hours_ago: float, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": eid, "app_id": APP, "type": kind, "subscription_id": "1000001",
                            "store": "app_store", "occurred_at": (NOW - timedelta(hours=hours_ago)).isoformat()}
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price="9.99", currency="USD")
    data.update(extra)
    return data


@pytest.fixture
def services(db_url: str) -> Any:
    config = settings_module.from_dict(
        {"api_token": TOKEN, "apps": {APP: {"destinations": {"segment": {"write_key": "k"}}}}}
    )
    return build(config, database_url=db_url, clock=lambda: NOW)


@pytest.fixture
def client(services: Any) -> Iterator[TestClient]:
    with TestClient(create_app(services)) as c:
        yield c


def messages(conn: psycopg.Connection) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    rows = conn.execute("SELECT subscriber, body FROM outbox ORDER BY id").fetchall()
    return [(subscriber, body[0], body[1]) for subscriber, body in rows]


def link(client: TestClient, user: str, **body: Any) -> Any:
    payload = {"app_id": APP, "subscription_id": "1000001", "store": "app_store", **body}
    return client.post(f"/v1/subscribers/{user}/links", json=payload, headers=AUTH)


def test_link_attributes_later_messages_with_aliases(client: TestClient, conn: psycopg.Connection,
                                                     services: Any) -> None:
    assert client.post("/v1/events", json=event("p1", "purchase", 3), headers=AUTH).status_code == 200
    linked = link(client, "user-9")
    assert linked.status_code == 200, linked.text
    assert linked.json() == {"app_user_id": "user-9", "app_id": APP, "subscription_key": KEY,
                             "previous_app_user_id": None}
    assert client.post("/v1/events", json=event("r1", "renewal", 2), headers=AUTH).status_code == 200
    (anon, track1, identify1), (user, track2, identify2) = messages(conn)
    assert anon == f"anon:{KEY}" and track1["anonymousId"] == anon and "aliases" not in identify1["traits"]
    assert user == "user-9" and track2["userId"] == "user-9" and identify2["userId"] == "user-9"
    assert identify2["traits"]["aliases"] == [f"anon:{KEY}", "user-9"]
    assert track2["properties"]["app_user_id"] == "user-9"
    # the audit finds the subscription by the linked user; the links are listed
    assert audit.timeline(conn, "user-9").subscriptions == [KEY]
    listed = client.get("/v1/subscribers/user-9/links", headers=AUTH).json()
    assert [x["subscription_key"] for x in listed["links"]] == [KEY]
    # re-linking says who it was linked to; an event's own user id is kept as an alias
    assert link(client, "user-10").json()["previous_app_user_id"] == "user-9"
    client.post("/v1/events", json=event("c1", "auto_renew_disabled", 1, app_user_id="u-store"), headers=AUTH)
    _, track3, identify3 = messages(conn)[-1]
    assert track3["userId"] == "user-10" and identify3["traits"]["aliases"] == ["u-store", "user-10"]
    # message ids do not depend on the user: a replay after linking adds nothing
    report = replay(conn, services.policy, NOW)
    assert report.messages == 0 and report.transitions == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"store": "itunes"}, "store"),
        ({"app_id": ""}, "app_id"),
        ({"subscription_id": None}, "subscription_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_link_refuses_bad_bodies(client: TestClient, conn: psycopg.Connection, body: dict[str, Any],
                                 field: str) -> None:
    response = link(client, "user-1", **body)
    assert response.status_code == 422 and field in response.json()["field"]
    assert conn.execute("SELECT count(*) FROM identity_links").fetchone() == (0,)


def test_link_refuses_unconfigured_apps_and_missing_tokens(client: TestClient) -> None:
    unknown = link(client, "user-1", app_id="com.other")
    assert unknown.status_code == 422 and unknown.json()["field"] == "app_id"
    payload = {"app_id": APP, "subscription_id": "1", "store": "app_store"}
    assert client.post("/v1/subscribers/u/links", json=payload).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/v1/subscribers/u/links", json=payload, headers=wrong).status_code == 401
