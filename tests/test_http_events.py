"""`POST /v1/events`: per-item results, clear 4xx errors, nothing stored for what was refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "com.example"
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)  # the service's injected clock: events below are 2 h old


def event(eid: str = "e1", **extra: Any) -> dict[str, Any]:
    base = {
        "id": eid, "app_id": APP, "type": "purchase", "occurred_at": (NOW - timedelta(hours=2)).isoformat(),
        "subscription_id": "s1", "product_id": "monthly", "price": "4.99", "currency": "EUR",
    }
    base.update(extra)
    return base


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    config = settings_module.from_dict(
        {"api_token": TOKEN, "apps": {APP: {"destinations": {"segment": {"write_key": "k"}}}}}
    )
    with TestClient(create_app(build(config, database_url=db_url, clock=lambda: NOW))) as c:
        yield c


def log_count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM event_log").fetchone()
        assert row is not None
        return int(row[0])


def test_single_event_new_then_duplicate(client: TestClient, db_url: str) -> None:
    first = client.post("/v1/events", json=event(), headers=AUTH)
    assert first.status_code == 200, first.text
    assert first.json()["result"] == "new" and len(first.json()["transitions"]) == 1
    again = client.post("/v1/events", json=event(), headers=AUTH)
    assert again.json()["result"] == "duplicate"
    assert log_count(db_url) == 1


def test_array_mixed_valid_and_invalid(client: TestClient, db_url: str) -> None:
    body = [event("ok1"), event("bad", occurred_at="yesterday"), event("ok2", subscription_id="s2"),
            {"id": "x"}, "not an object"]
    response = client.post("/v1/events", json=body, headers=AUTH)
    assert response.status_code == 200
    data = response.json()
    assert [r["result"] for r in data["results"]] == ["new", "rejected", "new", "rejected", "rejected"]
    assert data["results"][1]["field"] == "occurred_at" and data["results"][1]["id"] == "bad"
    assert data["results"][3]["field"] == "app_id"
    assert (data["new"], data["duplicate"], data["rejected"]) == (2, 0, 3)
    assert log_count(db_url) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (event(id=None), "id"),
        (event(app_id=5), "app_id"),
        (event(type="bogus"), "type"),
        (event(occurred_at="2026-13-01T00:00:00Z"), "occurred_at"),
        (event(occurred_at="2026-11-01T00:00:00"), "occurred_at"),
        (event(currency="euro"), "currency"),
        (event(price="abc"), "price"),
        (event(price=[1]), "price"),
        (event(subscription_id=None), "subscription_id"),
        (event(product_id=None), "product_id"),
        (event(app_id="unknown.app"), "app_id"),
        (event(id="x" * 201), "id"),
        (event(environment="staging"), "environment"),
    ],
)
def test_bad_field_is_named(client: TestClient, db_url: str, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/events", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert response.json()["error"]
    assert log_count(db_url) == 0


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/events", content=b'{"id": ', headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


def test_body_over_one_megabyte_is_413(client: TestClient, db_url: str) -> None:
    big = json.dumps([event(f"e{i}", attributes={"pad": "x" * 2000}) for i in range(600)])
    response = client.post("/v1/events", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert log_count(db_url) == 0


def test_more_than_1000_events_is_413(client: TestClient) -> None:
    response = client.post("/v1/events", json=[event(f"e{i}") for i in range(1001)], headers=AUTH)
    assert response.status_code == 413
    assert "1000" in response.json()["error"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_missing_or_wrong_token_is_401(client: TestClient, db_url: str, headers: dict[str, str]) -> None:
    response = client.post("/v1/events", json=event(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]
    assert log_count(db_url) == 0


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["pending"] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
hostile = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["id", "app_id", "type", "occurred_at", "subscription_id", "price", "currency",
                         "product_id", "expires_at", "environment", "period_type", "attributes"]),
        json_values, max_size=10,
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=hostile)
def test_hostile_bodies_never_500(client: TestClient, body: bytes) -> None:
    response = client.post("/v1/events", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("body", "field"),
    [(event(id="a\u0000b"), "id"), (event(product_id="p\u0000"), "product_id"),
     (event(attributes={"k": ["x\u0000"]}), "attributes.k[0]")],
)
def test_nul_characters_are_refused_not_a_database_error(
    client: TestClient, db_url: str, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/events", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert log_count(db_url) == 0
