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
    """(subscriber, track, identify) of the transitions' messages, in outbox order."""
    rows = conn.execute("SELECT subscriber, body FROM outbox WHERE transition_id LIKE 'tr_%' ORDER BY id").fetchall()
    return [(subscriber, body[0], body[1]) for subscriber, body in rows]


def link_identifies(conn: psycopg.Connection) -> list[tuple[str, str, dict[str, Any]]]:
    rows = conn.execute("SELECT transition_id, subscriber, body FROM outbox WHERE transition_id LIKE 'link:%'"
                        " ORDER BY id").fetchall()
    return [(tid, subscriber, body[0]) for tid, subscriber, body in rows]


def link(client: TestClient, user: str, **body: Any) -> Any:
    payload = {"app_id": APP, "subscription_id": "1000001", "store": "app_store", **body}
    return client.post(f"/v1/subscribers/{user}/links", json=payload, headers=AUTH)


def test_link_attributes_later_messages_with_aliases(client: TestClient, conn: psycopg.Connection,
                                                     services: Any) -> None:
    assert client.post("/v1/events", json=event("p1", "purchase", 3), headers=AUTH).status_code == 200
    linked = link(client, "user-9")
    assert linked.status_code == 200, linked.text
    answer = linked.json()
    assert {k: v for k, v in answer.items() if k != "identify"} == {
        "app_user_id": "user-9", "app_id": APP, "subscription_key": KEY, "previous_app_user_id": None}
    # the link is told at once: one identify merging the anonymous profile into the user's
    ((tid, subscriber, now_identify),) = link_identifies(conn)
    assert answer["identify"] == [now_identify["messageId"]] and now_identify["messageId"].endswith(".i")
    assert (tid, subscriber) == (f"link:{KEY}", "user-9")
    assert now_identify["userId"] == "user-9" and now_identify["anonymousId"] == f"anon:{KEY}"
    assert now_identify["traits"] == {"aliases": [f"anon:{KEY}", "user-9"], "last_seen_app_user_id": "user-9",
                                      "subscription_status": "active"}
    assert link(client, "user-9").json()["identify"] == []  # the same link again sends nothing new
    assert client.post("/v1/events", json=event("r1", "renewal", 2), headers=AUTH).status_code == 200
    (anon, track1, identify1), (user, track2, identify2) = messages(conn)
    assert anon == f"anon:{KEY}" and track1["anonymousId"] == anon and "aliases" not in identify1["traits"]
    assert user == "user-9" and track2["userId"] == "user-9" and identify2["userId"] == "user-9"
    assert identify2["traits"]["aliases"] == [f"anon:{KEY}", "user-9"]
    assert track2["properties"]["app_user_id"] == "user-9"
    # the audit finds the subscription by the linked user; the links are listed
    found = audit.timeline(conn, "user-9")
    assert found.subscriptions == [KEY]
    assert [d.transition_id for d in found.deliveries].count(f"link:{KEY}") == 1
    listed = client.get("/v1/subscribers/user-9/links", headers=AUTH).json()
    assert [x["subscription_key"] for x in listed["links"]] == [KEY]
    # re-linking says who it was linked to; an event's own user id is kept as an alias
    relinked = link(client, "user-10").json()
    assert relinked["previous_app_user_id"] == "user-9" and len(relinked["identify"]) == 1
    client.post("/v1/events", json=event("c1", "auto_renew_disabled", 1, app_user_id="u-store"), headers=AUTH)
    _, track3, identify3 = messages(conn)[-1]
    assert track3["userId"] == "user-10" and identify3["traits"]["aliases"] == ["u-store", "user-10"]
    # message ids do not depend on the user: a replay after linking adds nothing
    report = replay(conn, services.policy, NOW)
    assert report.messages == 0 and report.transitions == 0


def test_link_before_any_event_sends_nothing_now(client: TestClient, conn: psycopg.Connection) -> None:
    assert link(client, "user-1").json()["identify"] == []
    client.post("/v1/events", json=event("p1", "purchase", 3), headers=AUTH)
    ((subscriber, track, identify),) = messages(conn)
    assert subscriber == "user-1" and track["userId"] == "user-1"
    assert identify["traits"]["aliases"] == [f"anon:{KEY}", "user-1"]


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


def test_the_relay_delivers_the_link_identify(db_url: str) -> None:
    from fake_segment import WRITE_KEY, FakeSegment

    from subledger.app.worker import build_relay

    with FakeSegment() as fake:
        config = settings_module.from_dict({"api_token": TOKEN, "apps": {APP: {"destinations": {"segment": {
            "write_key": WRITE_KEY, "endpoint": fake.url, "timeout_seconds": 2.0}}}}})
        services = build(config, database_url=db_url, clock=lambda: NOW)
        with TestClient(create_app(services)) as c:
            c.post("/v1/events", json=event("p1", "purchase", 3), headers=AUTH)
            sent = link(c, "user-7").json()["identify"]
            c.post("/v1/events", json=event("r1", "renewal", 2), headers=AUTH)
        relay = build_relay(services)
        try:
            stats = relay.drain_all(timeout=20)
        finally:
            relay.close()
        assert stats.delivered == 3
        received = [(m["type"], m.get("userId"), m.get("anonymousId")) for m in fake.capture.messages()]
        # the anonymous purchase, the link's identify (both ids: the profiles merge), the renewal as the user
        assert sorted(received, key=str) == sorted([
            ("track", None, f"anon:{KEY}"), ("identify", None, f"anon:{KEY}"),
            ("identify", "user-7", f"anon:{KEY}"), ("track", "user-7", None), ("identify", "user-7", None),
        ], key=str)
        assert sent[0] in {m["messageId"] for m in fake.capture.messages()}
    with psycopg.connect(db_url) as conn:
        found = audit.timeline(conn, "user-7")
    assert [d.status for d in found.deliveries] == ["delivered"] * 3
