"""The bundled samples: the Apple demo lifecycle verifies against the bundled demo root, and
`ingest_samples` (what `subledger demo` runs) stores canonical, Apple and Stripe samples.

Regenerate app/samples/apple_lifecycle.ndjson and apple_demo_root.json with
`python tests/test_webhooks_samples.py` (a fresh throwaway chain; its private keys are not kept).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from apple_signing import SigningCA, make_ca, notification, renewal_info, transaction

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.samples_loader import (
    DEMO_APP,
    DEMO_APP_APPLE_ID,
    SAMPLES,
    STRIPE_DEMO_APP,
    demo_root_file,
    ingest_samples,
    sample_apps,
)
from subledger.app.sources import build_sources
from subledger.core.lifecycle import TransitionKind, fold

DEMO_USER = "b8f0c2de-5c47-4f0e-9a51-0d5c1d2e3f40"
DEMO_OTID = "2000000900000042"
DEMO_PRODUCT = "com.example.fitness.monthly"
START = datetime(2026, 8, 3, 9, 0, tzinfo=UTC)


def build_apple_sample(ca: SigningCA) -> list[bytes]:
    """Trial → converted → renewal → auto-renew off → expired, plus Apple's TEST ping (stored only)."""
    env = "Production"

    def txn(tid: str, at: datetime, days: int, **extra: Any) -> dict[str, Any]:
        return transaction(original_transaction_id=DEMO_OTID, transaction_id=tid, product_id=DEMO_PRODUCT,
                           purchase=at, expires=at + timedelta(days=days), environment=env, bundle_id=DEMO_APP,
                           app_account_token=DEMO_USER, **extra)

    def note(kind: str, subtype: str | None, at: datetime, uuid: str, **kw: Any) -> bytes:
        return notification(ca, kind, subtype, environment=env, bundle_id=DEMO_APP, app_apple_id=DEMO_APP_APPLE_ID,
                            signed=at, notification_uuid=uuid, **kw)

    converted = START + timedelta(days=7)
    renewed = converted + timedelta(days=31)
    off = renewed + timedelta(days=15)
    ends = renewed + timedelta(days=30)
    last = txn("2000000900000044", renewed, 30)
    return [
        note("TEST", None, START - timedelta(days=1), "5e1d0a7c-0000-4000-8000-000000000000"),
        note("SUBSCRIBED", "INITIAL_BUY", START, "5e1d0a7c-0000-4000-8000-000000000001",
             txn=txn(DEMO_OTID, START, 7, trial=True)),
        note("DID_RENEW", None, converted, "5e1d0a7c-0000-4000-8000-000000000002",
             txn=txn("2000000900000043", converted, 31)),
        note("DID_RENEW", None, renewed, "5e1d0a7c-0000-4000-8000-000000000003", txn=last),
        note("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", off, "5e1d0a7c-0000-4000-8000-000000000004",
             txn=last, renewal=renewal_info(original_transaction_id=DEMO_OTID, product_id=DEMO_PRODUCT,
                                            auto_renew=False, environment=env, signed=off, expirationIntent=1)),
        note("EXPIRED", "VOLUNTARY", ends, "5e1d0a7c-0000-4000-8000-000000000005", txn=last),
    ]


def sample_lines(name: str) -> list[bytes]:
    path = Path(__file__).resolve().parent.parent / "app" / "samples" / name
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def test_bundled_apple_lifecycle_verifies_with_the_demo_root_and_folds(tmp_path: Path) -> None:
    settings = settings_module.from_dict({"apps": sample_apps({}, tmp_path)})
    adapter = build_sources(settings).apple[DEMO_APP]
    notes = [adapter.parse(line) for line in sample_lines("apple_lifecycle.ndjson")]
    assert notes[0].kind == "TEST" and notes[0].events == ()
    events = [e for n in notes for e in n.events]
    assert {e.app_user_id for e in events} == {DEMO_USER}
    assert [t.kind for t in fold(events).transitions] == [
        TransitionKind.TRIAL_STARTED,
        TransitionKind.TRIAL_CONVERTED,
        TransitionKind.RENEWAL,
        TransitionKind.CANCELLATION,
        TransitionKind.EXPIRATION,
    ]


def test_demo_root_file_is_stable_and_rewritten_when_changed(tmp_path: Path) -> None:
    first = demo_root_file(tmp_path)
    first.write_bytes(b"tampered")
    assert demo_root_file(tmp_path) == first
    assert first.read_bytes() != b"tampered"


def test_ingest_samples_stores_every_bundled_sample(db_url: str, tmp_path: Path) -> None:
    destinations = {"segment": {"write_key": "k", "publish_historical": True}}
    services = build(settings_module.from_dict({"apps": sample_apps(destinations, tmp_path)}), database_url=db_url)
    results = dict(ingest_samples(services))
    assert list(results) == [s.name for s in SAMPLES]
    assert all(summary.rejected == 0 for summary in results.values()), {k: v.rejections for k, v in results.items()}
    assert results["apple_lifecycle.ndjson"].transitions == 5
    assert results["stripe_lifecycle.ndjson"].transitions == 5
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT source, app_id, count(*) FROM event_log GROUP BY 1, 2 ORDER BY 1").fetchall()
    assert rows == [
        ("apple", DEMO_APP, 6),
        ("custom", DEMO_APP, results["canonical_lifecycle.ndjson"].new),
        ("stripe", STRIPE_DEMO_APP, 8),
    ]
    again = dict(ingest_samples(services))
    assert sum(s.new for s in again.values()) == 0


if __name__ == "__main__":
    samples = Path(__file__).resolve().parent.parent / "app" / "samples"
    demo_ca = make_ca(name="subledger demo (not Apple)")
    (samples / "apple_lifecycle.ndjson").write_bytes(b"".join(line + b"\n" for line in build_apple_sample(demo_ca)))
    (samples / "apple_demo_root.json").write_text(json.dumps({
        "about": "Root of the throwaway chain that signed apple_lifecycle.ndjson for `subledger demo`. "
                 "Not Apple's: never trust it in production (use Apple Root CA - G3).",
        "der_base64": base64.b64encode(demo_ca.root_der).decode(),
    }, indent=2) + "\n")
    print(f"wrote {samples / 'apple_lifecycle.ndjson'} and apple_demo_root.json")
