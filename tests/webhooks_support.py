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


def config_dict(root: Path, endpoint: str = "http://127.0.0.1:9", **apple: Any) -> dict[str, Any]:
    destination = {
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
