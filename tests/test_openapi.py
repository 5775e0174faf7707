"""`/openapi.json` tells the truth: a bounded schemathesis run finds no 5xx and nothing undocumented.

Every operation of the served document is exercised in-process (ASGI) against a real, migrated
database with a valid bearer token, with examples that follow the schema and examples that break
it, plus schemathesis's coverage cases (boundary values, undeclared methods). Each response must be
no server error, a documented status code with a documented content type, a body that conforms to
the declared schema, documented headers, and a 405 must carry `Allow`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.engine import Status, events, from_schema
from schemathesis.python import asgi
from test_e2e_google import google_config
from webhooks_support import RC_APP, STRIPE_APP, write_root

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app

TOKEN = "openapi-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
README_APP = "com.example.app"  # the app of the README's (and the document's) example event
NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)  # the service's injected clock; nothing here depends on today
# fuzzing examples per operation (coverage cases come on top); OPENAPI_MAX_EXAMPLES / OPENAPI_SEED explore further
MAX_EXAMPLES = int(os.environ.get("OPENAPI_MAX_EXAMPLES", "25"))

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "unsupported_method"]
RUN: dict[str, Any] = {
    "headers": AUTH,
    "seed": int(os.environ.get("OPENAPI_SEED", "20261101")),  # reproducible: a failure found once is found again
    "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    # a configured app in the path, so the webhooks get past routing to their signature checks
    "operations": [
        {"include-path": "/webhooks/stripe/{app_id}", "parameters": {"path.app_id": STRIPE_APP}},
        {"include-path": "/webhooks/revenuecat/{app_id}", "parameters": {"path.app_id": RC_APP}},
    ],
}


def _config(tmp_path: Path) -> settings_module.Settings:
    """Every source configured (so every webhook is reached past "unknown app"), and the README's app."""
    config = google_config(write_root(tmp_path), "http://127.0.0.1:9", "http://127.0.0.1:9")
    config["apps"][README_APP] = {"destinations": {"segment": {"write_key": "k", "endpoint": "http://127.0.0.1:9"}}}
    return settings_module.from_dict({"api_token": TOKEN, **config})


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Any:
    return create_app(build(_config(tmp_path), database_url=db_url, clock=lambda: NOW), pool_size=2)


@pytest.fixture
def api_schema(app: Any) -> Iterator[Any]:
    """The served document, bound in-process to the app; the app's lifespan (and so its pool) is
    started by schemathesis on the first request and ended here."""
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict(RUN))
    finally:
        asgi.shutdown_lifespans()


def _describe(label: str, check: str, message: str, interaction: Any) -> str:
    line = f"{label}: {check}: {message.splitlines()[0] if message else ''}"
    if interaction is not None:
        request, response = interaction.request, interaction.response
        body = (request.body or b"")[:120]
        answered = f"{response.status_code} {(response.content or b'')[:160]!r}" if response else "no response"
        line += f"\n    {request.method} {request.uri[:160]} body={body!r} -> {answered}"
    return line


def test_schemathesis_finds_nothing_undocumented(api_schema: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Examples, coverage cases (boundaries, undeclared methods) and fuzzing, positive and negative:
    no 5xx, every status code, content type, header and body as documented, 405s with `Allow`."""
    per_operation: Counter[str] = Counter()
    per_phase: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for event in from_schema(api_schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            per_operation[recorder.label] += len(recorder.cases)
            per_phase[event.phase.value] += len(recorder.cases)
            for interaction in recorder.interactions.values():
                if interaction.response is not None:
                    statuses[interaction.response.status_code] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE:
                        info = check.failure_info
                        message = info.failure.message if info is not None else ""
                        failures.append(_describe(recorder.label, check.name, message,
                                                  recorder.interactions.get(case_id)))
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"error: {event!r}"[:2000])
        elif isinstance(event, events.EngineFinished):
            assert event.stop_reason.value == "completed", event.stop_reason
    operations = {f"{method.upper()} {path}" for path, ops in api_schema.raw_schema["paths"].items() for method in ops}
    assert set(per_operation) == operations
    assert all(per_operation[o] > 0 for o in operations), per_operation
    with capsys.disabled():
        print(f"\nschemathesis: {len(operations)} operations, {sum(per_operation.values())} cases "
              f"{dict(per_phase)}, statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(dict.fromkeys(failures))  # each distinct failure once


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def test_every_route_documents_its_refusals(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "200" in codes, (method, path)
            for code in codes - {"200"}:
                content = operation["responses"][code].get("content", {})
                assert "application/json" in content, (method, path, code)
            if path.startswith("/v1/"):
                assert {"401", "503"} <= codes and operation["security"] == [{"bearerAuth": []}], (method, path)
            if "503" in codes:
                assert "Retry-After" in operation["responses"]["503"]["headers"], (method, path)


def test_documented_bodies(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    events = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    single, array = events["anyOf"]
    assert single == {"$ref": "#/components/schemas/CanonicalEvent"} and array["maxItems"] == 1000
    canonical = doc["components"]["schemas"]["CanonicalEvent"]
    assert set(canonical["required"]) == {"id", "app_id", "type", "occurred_at"}
    assert "purchase" in canonical["properties"]["type"]["enum"]
    for path in ("/webhooks/apple", "/webhooks/stripe/{app_id}", "/webhooks/revenuecat/{app_id}", "/webhooks/google"):
        assert doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"]
    ndjson = doc["paths"]["/v1/audit/events"]["get"]["responses"]["200"]["content"]
    assert list(ndjson) == ["application/x-ndjson"]


def test_405_says_allow(client: TestClient) -> None:
    response = client.delete("/v1/events", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {"error": "Method Not Allowed"}


def test_single_rejection_has_no_null_field(client: TestClient) -> None:
    response = client.post("/v1/events", json="not an object", headers=AUTH)
    assert response.status_code == 422
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize("ref", ["²", "١٢", "99999999999999999999999999"])
def test_retry_of_a_digit_like_ref_is_404(client: TestClient, ref: str) -> None:
    """Found by schemathesis: `'²'.isdigit()` is true, so `int(ref)` raised and the route answered 500."""
    response = client.post(f"/v1/outbox/{ref}/retry", headers=AUTH)
    assert response.status_code == 404, response.text
    assert response.json()["error"]
