"""Shared by the webhook and end-to-end tests: one configuration with an app per source, a client.

Apple notifications are signed by the throwaway chain of `apple_signing` (its root is written to a
file, as an operator would save Apple Root CA G3); Stripe bodies are signed with the endpoint
secret as Stripe does; RevenueCat bodies carry the configured Authorization value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from apple_signing import APP_APPLE_ID, BUNDLE_ID, SigningCA, make_ca
from fastapi.testclient import TestClient

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.core.sources.stripe import signature_header

APPLE_APP = BUNDLE_ID  # "com.example.fitness"
STRIPE_APP = "com.example.fitness.web"
RC_APP = "com.example.fitness.rc"
OTHER_APP = "com.example.nosources"
STRIPE_SECRET = "whsec_e2e_secret"
RC_AUTH = "Bearer rc-e2e-secret"
WRITE_KEY = "wk-live"
SANDBOX_KEY = "wk-sandbox"

CA: SigningCA = make_ca()


def write_root(directory: Path, ca: SigningCA = CA) -> Path:
    path = directory / "AppleRootCA-test.cer"
    path.write_bytes(ca.root_der)
    return path


def config_dict(root: Path, endpoint: str = "http://127.0.0.1:9", *, destination_settings: dict[str, Any] | None = None,
                **apple: Any) -> dict[str, Any]:
    destination = {
        **(destination_settings or {}),
        "write_key": WRITE_KEY,
        "sandbox_write_key": SANDBOX_KEY,
        "endpoint": endpoint,
        "send_sandbox": True,
        "publish_historical": True,
        "timeout_seconds": 2.0,
    }
    return {
        "apps": {
            APPLE_APP: {
                "destinations": {"segment": dict(destination)},
                "apple": {"app_apple_id": APP_APPLE_ID, "root_certificates": [str(root)], **apple},
            },
            STRIPE_APP: {
                "destinations": {"segment": dict(destination)},
                "stripe": {"endpoint_secrets": [STRIPE_SECRET]},
            },
            RC_APP: {
                "destinations": {"segment": dict(destination)},
                "revenuecat": {"authorization": RC_AUTH},
            },
            OTHER_APP: {"destinations": {"segment": dict(destination)}},
        }
    }


@contextmanager
def webhook_client(db_url: str, root: Path, endpoint: str = "http://127.0.0.1:9") -> Iterator[TestClient]:
    settings = settings_module.from_dict(config_dict(root, endpoint))
    with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
        yield client


def stripe_headers(raw: bytes, secret: str = STRIPE_SECRET, at: int | None = None) -> dict[str, str]:
    return {
        "Stripe-Signature": signature_header(raw, secret, int(time.time()) if at is None else at),
        "Content-Type": "application/json",
    }


def rc_headers(auth: str = RC_AUTH) -> dict[str, str]:
    return {"Authorization": auth, "Content-Type": "application/json"}


def rc_body(event: dict[str, Any]) -> bytes:
    return json.dumps({"api_version": "1.0", "event": event}).encode()


def log_rows(db_url: str) -> list[tuple[str, str, bytes]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT source, external_id, raw FROM event_log ORDER BY position").fetchall()
    return [(s, e, bytes(r)) for s, e, r in rows]


def log_count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM event_log").fetchone()
    assert row is not None
    return int(row[0])


# --- end to end: webhook → log → fold → outbox → relay → fake Segment ----------------------------

TRACK_KEYS = ("revenue", "currency", "product_id", "new_product_id", "period_type", "store", "environment",
              "transaction_id", "cancel_reason", "expiration_reason")


class Pipeline:
    """The HTTP service and a relay pointed at a fake Segment on 127.0.0.1, over one test database."""

    def __init__(self, client: TestClient, fake: Any, settings: Any, db_url: str) -> None:
        self.client = client
        self.fake = fake
        self.settings = settings
        self.db_url = db_url

    def post(self, path: str, raw: bytes, headers: dict[str, str]) -> dict[str, Any]:
        response = self.client.post(path, content=raw, headers=headers)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def relay(self) -> list[dict[str, Any]]:
        """Drain the outbox into the fake Segment; everything it has received so far, in arrival order."""
        from datetime import timedelta

        from subledger.core.delivery import Backoff
        from subledger.outbox.relay import Relay, RelayConfig
        from subledger.outbox.routes import routes_from

        relay = Relay(self.db_url, routes_from(self.settings.apps),
                      RelayConfig(backoff=Backoff(0.01, 0.05), lease=timedelta(seconds=30)))
        try:
            relay.drain_all(timeout=15)
        finally:
            relay.close()
        assert self.fake.capture.duplicates() == {}
        messages: list[dict[str, Any]] = self.fake.capture.messages()
        return messages


@contextmanager
def pipeline(db_url: str, root: Path, *, destination_settings: dict[str, Any] | None = None) -> Iterator[Pipeline]:
    """`destination_settings`: extra settings of every app's destination (e.g. its revenue mode)."""
    from fake_segment import FakeSegment

    with FakeSegment(write_keys=(WRITE_KEY, SANDBOX_KEY)) as fake:
        settings = settings_module.from_dict(config_dict(root, fake.url, destination_settings=destination_settings))
        with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
            yield Pipeline(client, fake, settings, db_url)


def track(event: str, who: str, **properties: Any) -> dict[str, Any]:
    """What a track is expected to say: the event, the user, and TRACK_KEYS (absent ones as None)."""
    return {"event": event, "userId": who, **{k: properties.get(k) for k in TRACK_KEYS}}


def tracks(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tracks received, in occurrence order, reduced to what `track` states."""
    received = sorted((m for m in messages if m["type"] == "track"), key=lambda m: m["timestamp"])
    return [
        {"event": m["event"], "userId": m.get("userId") or m.get("anonymousId"),
         **{k: m["properties"].get(k) for k in TRACK_KEYS}}
        for m in received
    ]


def statuses(messages: list[dict[str, Any]]) -> list[str]:
    """The `subscription_status` trait of each identify, in occurrence order."""
    identifies = sorted((m for m in messages if m["type"] == "identify"), key=lambda m: m["timestamp"])
    return [m["traits"].get("subscription_status") for m in identifies]


def superseded(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM transitions WHERE superseded_at IS NOT NULL").fetchone()
    assert row is not None
    return int(row[0])
