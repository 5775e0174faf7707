"""`subledger ingest --format apple|stripe|revenuecat`: captured bodies through the webhooks' adapters."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import psycopg
import pytest
from apple_signing import notification, transaction
from test_source_revenuecat import rc_event
from webhooks_support import (
    APPLE_APP,
    CA,
    RC_APP,
    STRIPE_APP,
    config_dict,
    log_rows,
    rc_body,
    write_root,
)

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.stream_ingest import ingest_stream
from subledger.core.errors import ConfigError

STRIPE_SAMPLE = resources.files("subledger.app.samples").joinpath("stripe_lifecycle.ndjson").read_bytes()


def services(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    return build(settings_module.from_dict(config_dict(write_root(tmp_path))), database_url=db_url)


def transitions(db_url: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        return [k for (k,) in conn.execute("SELECT kind FROM transitions ORDER BY occurred_at, id")]


def test_stripe_capture_is_trusted_and_stored_verbatim(db_url: str, tmp_path: Path) -> None:
    summary = ingest_stream(services(db_url, tmp_path), io.BytesIO(STRIPE_SAMPLE), "s.ndjson",
                            historical=False, progress=None, fmt="stripe")
    lines = [line for line in STRIPE_SAMPLE.splitlines() if line.strip()]
    assert (summary.new, summary.rejected, summary.transitions) == (len(lines), 0, 5)
    assert [raw for _, _, raw in log_rows(db_url)] == lines
    assert transitions(db_url) == ["trial_started", "trial_converted", "renewal", "cancellation", "expiration"]
    again = ingest_stream(services(db_url, tmp_path), io.BytesIO(STRIPE_SAMPLE), "s.ndjson",
                          historical=False, progress=None, fmt="stripe", app_id=STRIPE_APP)
    assert (again.new, again.duplicate) == (0, len(lines))


def test_stripe_capture_links_a_basil_refund_within_one_file(db_url: str, tmp_path: Path) -> None:
    from test_source_stripe import charge, event, invoice
    from test_webhooks import invoice_payment_paid

    lines = [
        json.dumps(event("invoice.paid", invoice(invoice_id="in_basil"), event_id="evt_paid")),
        json.dumps(invoice_payment_paid("in_basil", "pi_3RKxFitness0001", "evt_link")),
        json.dumps(event("charge.refunded", charge(invoice_ref=None), event_id="evt_refund")),
    ]
    data = ("\n".join(lines) + "\n").encode()
    summary = ingest_stream(services(db_url, tmp_path), io.BytesIO(data), "s.ndjson", historical=False,
                            progress=None, fmt="stripe")
    assert (summary.new, summary.transitions) == (3, 2)  # the renewal, then the refund's cancellation
    assert sorted(transitions(db_url)) == ["cancellation", "renewal"]


def test_apple_capture_is_verified_and_bad_lines_are_named(db_url: str, tmp_path: Path) -> None:
    good = notification(CA, "SUBSCRIBED", "INITIAL_BUY", txn=transaction(trial=True), notification_uuid="cap-1")
    forged = notification(CA, "DID_RENEW", txn=transaction())
    forged = forged.replace(b'signedPayload": "ey', b'signedPayload": "ex')
    other_bundle = notification(CA, "TEST", bundle_id="com.example.unknown")
    # an item of Apple's Get Notification History answer, as is
    history_item = json.loads(notification(CA, "TEST", notification_uuid="cap-2"))
    history_item["sendAttemptResults"] = [{"attemptDate": 1698148900000, "sendAttemptResult": "SUCCESS"}]
    data = b"\n".join([good, b"{oops", forged, other_bundle, json.dumps(history_item).encode()]) + b"\n"
    summary = ingest_stream(services(db_url, tmp_path), io.BytesIO(data), "apple.ndjson",
                            historical=False, progress=None, fmt="apple")
    assert (summary.new, summary.rejected) == (2, 3)
    assert summary.rejections[0].startswith("apple.ndjson:2: malformed JSON")
    assert summary.rejections[1].startswith("apple.ndjson:3: signedPayload:")
    assert summary.rejections[2] == "apple.ndjson:4: bundleId: no app is configured for bundle id 'com.example.unknown'"
    assert [(s, e) for s, e, _ in log_rows(db_url)] == [("apple", "cap-1"), ("apple", "cap-2")]
    assert transitions(db_url) == ["trial_started"]
    assert APPLE_APP in services(db_url, tmp_path).settings.apps


def test_revenuecat_capture_goes_to_the_named_app(db_url: str, tmp_path: Path) -> None:
    data = rc_body(rc_event("INITIAL_PURCHASE", period_type="TRIAL", price=0, price_in_purchased_currency=0))
    summary = ingest_stream(services(db_url, tmp_path), io.BytesIO(data + b"\n"), "rc.ndjson",
                            historical=False, progress=None, fmt="revenuecat")
    assert (summary.new, summary.rejected) == (1, 0)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT app_id FROM event_log").fetchone() == (RC_APP,)


def test_revenuecat_capture_applies_a_transfer_as_the_webhook_does(db_url: str, tmp_path: Path) -> None:
    anon = "$RCAnonymousID:cli1"
    bought = rc_event("INITIAL_PURCHASE", id="rc-buy", app_user_id=anon, original_app_user_id=anon,
                      period_type="TRIAL", price=0, price_in_purchased_currency=0)
    moved = rc_event("TRANSFER", id="rc-move", transferred_from=[anon], transferred_to=["user_cli"])
    data = rc_body(bought) + b"\n" + rc_body(moved) + b"\n"
    summary = ingest_stream(services(db_url, tmp_path), io.BytesIO(data), "rc.ndjson",
                            historical=False, progress=None, fmt="revenuecat")
    assert (summary.new, summary.rejected) == (2, 0)
    with psycopg.connect(db_url) as conn:
        linked = conn.execute("SELECT app_user_id FROM identity_links").fetchall()
        told = conn.execute("SELECT count(*) FROM outbox WHERE transition_id LIKE 'link:%'").fetchone()
    assert linked == [("user_cli",)]
    assert told == (1,)  # the link's identify, one per destination, as POST /v1/subscribers/{id}/links sends


def test_format_without_an_app_is_a_config_error(db_url: str, tmp_path: Path) -> None:
    settings = settings_module.from_dict({"apps": {"a": {}, "b": {}}})
    with pytest.raises(ConfigError) as err:
        ingest_stream(build(settings, database_url=db_url), io.BytesIO(b"{}"), "x", historical=False,
                      progress=None, fmt="stripe")
    assert err.value.key == "--app"


def test_cli_ingest_format_stripe(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "subledger.toml"
    config.write_text(f'[apps."{STRIPE_APP}".destinations.segment]\nwrite_key = "k"\n')
    sample = tmp_path / "stripe.ndjson"
    sample.write_bytes(STRIPE_SAMPLE + b"not json\n")
    cmd = [sys.executable, "-m", "subledger.app", "ingest", str(sample), "--format", "stripe", "--app", STRIPE_APP,
           "--json", "--config", str(config), "--database-url", db_url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["new"], summary["rejected"], summary["transitions"]) == (8, 1, 5)
    assert summary["rejections"][0].startswith(f"{sample}:9: malformed JSON")
