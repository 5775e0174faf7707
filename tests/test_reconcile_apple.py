"""Apple reconciliation end to end: notifications dropped on the way, the App Store Server API's
notification history read from a fake Apple on 127.0.0.1 (through Apple's own library, its bearer
token checked), the lost facts logged (arrival = reconciliation), published once, never twice."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from apple_signing import APP_APPLE_ID, BUNDLE_ID, ms, notification_payload, renewal_info, sign, tamper, transaction
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fake_apple_api import ISSUER_ID, KEY_ID, FakeAppleApi, Record, Subscription, make_key
from webhooks_support import APPLE_APP, CA, Pipeline, config_dict, tracks, write_root

from subledger.app import settings as settings_module
from subledger.app.apple_api import AppleApi, from_settings
from subledger.app.bootstrap import build
from subledger.app.reconcile_apple import reconcile_apple, refresh_subscription, window_start
from subledger.app.sources import build_sources
from subledger.core.errors import BadSignature, ConfigError, InvalidEvent, SourceUnavailable
from subledger.core.sources import apple as apple_source
from subledger.store import reconciliation
from subledger.store.verify import verify

USER = "7e3fb20b-4cdb-47cc-936d-99d65f608138"  # the transactions' appAccountToken
OTID = "2000000111111111"
PROD = "Production"
JSON = {"Content-Type": "application/json"}
KEY, PEM = make_key()
CLOCK = 1_900_000_000.0  # what the API's clock says when a Retry-After is read (a UNIX time)


@dataclass(frozen=True)
class Note:
    uuid: str
    signed_payload: str
    at: datetime

    @property
    def body(self) -> bytes:
        return json.dumps({"signedPayload": self.signed_payload}).encode()


def txn(tid: str, at: datetime, **extra: Any) -> dict[str, Any]:
    return transaction(transaction_id=tid, purchase=at, expires=at + timedelta(days=30), environment=PROD, **extra)


def note(uuid: str, kind: str, subtype: str | None, at: datetime, **kwargs: Any) -> Note:
    payload = notification_payload(CA, kind, subtype, environment=PROD, signed=at, notification_uuid=uuid, **kwargs)
    return Note(uuid, sign(payload, CA), at)


def lifecycle(now: datetime) -> list[Note]:
    """A purchase two days ago, a TEST notification, the renewal a day ago, auto-renew switched off two
    hours ago: all younger than the 72 h horizon, so every fact is news whichever way it arrives."""
    t = now.replace(microsecond=0)
    buy, renew = t - timedelta(hours=48), t - timedelta(hours=24)
    test_data = {"environment": PROD, "bundleId": BUNDLE_ID, "appAppleId": APP_APPLE_ID}
    return [
        note("n-buy", "SUBSCRIBED", "INITIAL_BUY", buy, txn=txn("t1", buy)),
        note("n-test", "TEST", None, buy + timedelta(minutes=5), data=test_data),
        note("n-renew", "DID_RENEW", None, renew, txn=txn("t2", renew)),
        note("n-off", "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", t - timedelta(hours=2),
             txn=txn("t2", renew), renewal=renewal_info(auto_renew=False, environment=PROD, signed=t)),
    ]


DROPPED = {"n-renew", "n-off"}
EXPECTED = ["rc_initial_purchase_event", "rc_renewal_event", "rc_cancellation_event"]  # in occurrence order


def records(notes: list[Note], failed: set[str]) -> list[Record]:
    return [Record(n.signed_payload, ms(n.at), n.uuid in failed) for n in notes]


def apple_settings(root: Path, segment_url: str, api_url: str, key_path: Path) -> Any:
    raw = config_dict(root, segment_url, environments=[PROD], api_key=str(key_path), key_id=KEY_ID,
                      issuer_id=ISSUER_ID, api_base_url=api_url)
    return settings_module.from_dict(raw)


@dataclass
class World:
    p: Pipeline
    apple: FakeAppleApi
    notes: list[Note]
    sleeps: list[float]

    def push(self, skip: set[str]) -> None:
        for n in self.notes:
            if n.uuid not in skip:
                assert self.p.post("/webhooks/apple", n.body, JSON)["result"] == "new"

    def api(self) -> AppleApi:
        apple = self.p.settings.apps[APPLE_APP].apple
        return from_settings(apple, BUNDLE_ID, sleep=self.sleeps.append, clock=lambda: CLOCK)

    def run(self, *, all_types: bool = False, dry_run: bool = False, since: datetime | None = None) -> dict[str, Any]:
        services = build(self.p.settings, database_url=self.p.db_url)
        with psycopg.connect(self.p.db_url) as conn:
            summary = reconcile_apple(conn, build_sources(self.p.settings), self.api(), APPLE_APP, services.policy,
                                      datetime.now(UTC), since=since, all_types=all_types, dry_run=dry_run)
        return summary.as_json()


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[World]:
    """A pipeline whose Apple app reads a fake App Store Server API holding the lifecycle's notifications,
    DROPPED marked failed; pages of one record, the first call throttled."""
    from fake_segment import FakeSegment
    from fastapi.testclient import TestClient

    from subledger.app.http import create_app

    notes = lifecycle(datetime.now(UTC))
    key_path = tmp_path / "SubscriptionKey_TESTKEY123.p8"
    key_path.write_bytes(PEM)
    with FakeSegment() as segment, FakeAppleApi(KEY.public_key(), records(notes, DROPPED), page_size=1, throttle=1,
                                                retry_after_ms=int(CLOCK * 1000) + 1500) as apple:
        settings = apple_settings(write_root(tmp_path), segment.url, apple.url, key_path)
        with TestClient(create_app(build(settings, database_url=db_url), pool_size=2)) as client:
            yield World(Pipeline(client, segment, settings, db_url), apple, notes, [])


def events(p: Pipeline) -> list[str]:
    return [t["event"] for t in tracks(p.relay())]


def test_dropped_notifications_are_recovered_published_once_in_order_and_never_twice(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.push(skip=DROPPED)
    assert events(world.p) == ["rc_initial_purchase_event"]

    with caplog.at_level(logging.WARNING, logger="subledger.reconcile"):
        first = world.run()
    # a 429 first (Retry-After: 1.5 s from the API's clock), then the two failed records, a page each
    assert (first["recovered"], first["duplicates"], first["listed"]) == (2, 0, 2)
    assert (first["pages"], first["api_calls"], first["throttled"], first["mode"]) == (2, 3, 1, "failures")
    assert world.sleeps == [1.5]
    assert first["recovered_ids"] == ["n-renew", "n-off"]  # ingested oldest first
    assert any("recovered 2 apple event(s)" in r.getMessage() and APPLE_APP in r.getMessage()
               for r in caplog.records)
    assert events(world.p) == EXPECTED  # each once (Pipeline.relay asserts no duplicate messageId), in order

    again = world.run(all_types=True)
    assert (again["recovered"], again["duplicates"], again["listed"], again["mode"]) == (0, 4, 4, "all")
    assert events(world.p) == EXPECTED

    with psycopg.connect(world.p.db_url) as conn:
        arrivals = dict(conn.execute("SELECT external_id, arrival FROM event_log").fetchall())
        assert arrivals == {"n-buy": "push", "n-test": "push", "n-renew": "reconciliation",
                            "n-off": "reconciliation"}
        assert reconciliation.recovered_counts(conn) == {(APPLE_APP, "apple"): 2}
        assert reconciliation.cursor(conn, "apple/failures", APPLE_APP) is not None
        assert reconciliation.cursor(conn, "apple/all", APPLE_APP) is not None
        assert verify(conn).ok
    metrics = world.p.client.get("/metrics").text
    assert f'subledger_reconciliation_recovered_total{{app_id="{APPLE_APP}",source="apple"}} 2.0' in metrics

    # the library's bearer token, on every request: ES256, our key id, issuer, bundle id, audience, 5 min
    assert len(world.apple.tokens) == len(world.apple.requests)
    for token in world.apple.tokens:
        assert (token["header"]["alg"], token["header"]["kid"]) == ("ES256", KEY_ID)
        assert (token["iss"], token["bid"], token["aud"]) == (ISSUER_ID, BUNDLE_ID, "appstoreconnect-v1")
        assert 0 < token["exp"] - datetime.now(UTC).timestamp() <= 300
    # the frequent run asked for failures only, from 72 h back; the daily one for everything
    bodies = [body for method, path, _, body in world.apple.requests if path == "/inApps/v1/notifications/history"]
    assert bodies[0]["onlyFailures"] is True and "onlyFailures" not in bodies[-1]
    assert abs(bodies[0]["endDate"] - bodies[0]["startDate"] - 72 * 3600 * 1000) < 60_000


def test_with_every_notification_delivered_reconciliation_recovers_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.push(skip=set())
    assert events(world.p) == EXPECTED
    for r in world.apple.records:
        r.failed = r.signed_date == ms(world.notes[2].at)  # Apple counted one failed although it was retried
    with caplog.at_level(logging.WARNING, logger="subledger.reconcile"):
        failures, everything = world.run(), world.run(all_types=True)
    assert (failures["recovered"], failures["duplicates"]) == (0, 1)
    assert (everything["recovered"], everything["duplicates"]) == (0, 4)
    assert not [r for r in caplog.records if "recovered" in r.getMessage()]
    assert events(world.p) == EXPECTED
    with psycopg.connect(world.p.db_url) as conn:
        assert reconciliation.recovered_counts(conn) == {}


def test_a_dry_run_writes_nothing(world: World) -> None:
    world.push(skip=DROPPED)
    dry = world.run(dry_run=True)
    assert (dry["recovered"], dry["dry_run"], dry["recovered_ids"]) == (2, True, ["n-renew", "n-off"])
    with psycopg.connect(world.p.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (2,)
        assert reconciliation.cursor(conn, "apple/failures", APPLE_APP) is None


def test_a_page_that_fails_once_is_retried_and_a_run_the_api_stops_writes_nothing(world: World) -> None:
    world.push(skip=DROPPED)
    world.apple.throttle, world.apple.faults = 0, {2: 500}
    first = world.run()
    assert (first["recovered"], first["pages"], first["api_calls"], first["throttled"]) == (2, 2, 3, 0)
    history = [q for _, path, q, _ in world.apple.requests if path == "/inApps/v1/notifications/history"]
    assert [q.get("paginationToken") for q in history] == [None, ["page-1"], ["page-1"]]  # the failed page again

    world.apple.records.append(Record(note("n-late", "DID_RENEW", None, datetime.now(UTC) - timedelta(hours=1),
                                           txn=txn("t3", datetime.now(UTC))).signed_payload,
                                      ms(datetime.now(UTC) - timedelta(hours=1)), True))
    world.apple.faults = {len(world.apple.requests) + n: 503 for n in range(2, 8)}  # page 2 never answers
    with pytest.raises(SourceUnavailable, match="did not answer after 6 attempts"):
        world.run(all_types=True)
    with psycopg.connect(world.p.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (4,)
        assert reconciliation.cursor(conn, "apple/all", APPLE_APP) is None


def test_the_window(world: World) -> None:
    now = datetime.now(UTC)
    api = world.api()
    with psycopg.connect(world.p.db_url) as conn:
        assert window_start(conn, APPLE_APP, api, now, None, all_types=False) == now - timedelta(hours=72)
        assert window_start(conn, APPLE_APP, api, now, None, all_types=True) == now - timedelta(days=30)
        # a cursor resumes the run 72 h before it; the frequent run still covers the last 72 h
        reconciliation.advance(conn, "apple/all", APPLE_APP, now - timedelta(days=2), now)
        reconciliation.advance(conn, "apple/failures", APPLE_APP, now - timedelta(days=9), now)
        conn.commit()
        assert window_start(conn, APPLE_APP, api, now, None, all_types=True) == now - timedelta(days=5)
        assert window_start(conn, APPLE_APP, api, now, None, all_types=False) == now - timedelta(days=12)
        # --since reaches past history_days, never past Apple's 180 days
        long_ago = now - timedelta(days=400)
        assert window_start(conn, APPLE_APP, api, now, long_ago, all_types=True) > now - timedelta(days=180)


def statuses(status: int, latest: dict[str, Any], renewal: dict[str, Any]) -> dict[str, Any]:
    """Get All Subscription Statuses' answer for the one subscription OTID."""
    return {"environment": PROD, "bundleId": BUNDLE_ID, "appAppleId": APP_APPLE_ID, "data": [
        {"subscriptionGroupIdentifier": "55555", "lastTransactions": [
            {"status": status, "originalTransactionId": OTID, "signedTransactionInfo": sign(latest, CA),
             "signedRenewalInfo": sign(renewal, CA)}]}]}


def test_a_subscription_refresh_recovers_a_missed_renewal_and_expiration_once(world: World) -> None:
    buy = world.notes[0]
    assert world.p.post("/webhooks/apple", buy.body, JSON)["result"] == "new"  # nothing after it arrived
    now = datetime.now(UTC).replace(microsecond=0)
    renewed = now - timedelta(hours=24)
    t1 = txn("t1", buy.at)
    t2 = transaction(transaction_id="t2", purchase=renewed, expires=now - timedelta(hours=1), environment=PROD)
    world.apple.subscriptions[OTID] = Subscription(
        statuses(1, t2, renewal_info(environment=PROD, signed=now)), [sign(t1, CA), sign(t2, CA)])
    assert events(world.p) == ["rc_initial_purchase_event"]
    services = build(world.p.settings, database_url=world.p.db_url)

    def refresh(transaction_id: str = OTID) -> dict[str, Any]:
        with psycopg.connect(world.p.db_url) as conn:
            summary = refresh_subscription(conn, build_sources(world.p.settings), world.api(), APPLE_APP,
                                           services.policy, datetime.now(UTC), transaction_id)
        return summary.as_json()

    first = refresh()
    # a 429, the statuses, then the history in two pages of one (the fake's page size)
    assert (first["recovered"], first["duplicates"], first["listed"], first["mode"]) == (1, 1, 2, "subscription")
    assert (first["api_calls"], first["pages"], first["throttled"]) == (4, 2, 1)
    assert first["recovered_ids"] == ["-transaction:t2"]
    assert [q.get("revision") for _, p, q, _ in world.apple.requests if p.startswith("/inApps/v2/history/")] == [
        None, ["rev-1"]]
    assert events(world.p) == ["rc_initial_purchase_event", "rc_renewal_event"]
    assert refresh("t2")["recovered"] == 0  # any of its transaction ids names the subscription

    # Apple now says it expired (the user had turned auto-renew off): one expiration, once
    world.apple.subscriptions[OTID].statuses = statuses(2, t2, renewal_info(auto_renew=False, environment=PROD,
                                                                            signed=now, expirationIntent=1))
    expired = refresh()
    assert (expired["recovered"], expired["recovered_ids"]) == (1, ["-expired:t2"])
    assert refresh()["recovered"] == 0
    expected = ["rc_initial_purchase_event", "rc_renewal_event", "rc_expiration_event"]
    assert events(world.p) == expected

    # the renewal's and the expiration's own notifications, late (Apple retried them): logged, but
    # the fold had credited both facts to the recovered ones and derives nothing new
    late = [note("n-renew-late", "DID_RENEW", None, renewed, txn=t2),
            note("n-expired-late", "EXPIRED", "VOLUNTARY", now, txn=t2)]
    for n in late:
        assert world.p.post("/webhooks/apple", n.body, JSON)["result"] == "new"
    assert events(world.p) == expected
    with psycopg.connect(world.p.db_url) as conn:
        assert reconciliation.recovered_counts(conn) == {(APPLE_APP, "apple"): 2}
        assert verify(conn).ok

    with pytest.raises(InvalidEvent, match="knows no transaction '999'"):
        refresh("999")


def test_the_cli_reads_the_key_from_the_environment_and_prints_a_json_summary(world: World, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from subledger.app.cli import app as cli

    world.push(skip=DROPPED)
    world.apple.throttle = 0
    t1, t2 = txn("t1", world.notes[0].at), txn("t2", world.notes[2].at)
    world.apple.subscriptions[OTID] = Subscription(
        statuses(1, t2, renewal_info(environment=PROD, signed=datetime.now(UTC))), [sign(t1, CA), sign(t2, CA)])
    root = write_root(tmp_path)
    config = tmp_path / "subledger.toml"
    config.write_text(
        f'[apps."{APPLE_APP}".apple]\napp_apple_id = {APP_APPLE_ID}\nroot_certificates = ["{root}"]\n'
        f'environments = ["{PROD}"]\napi_key = "${{APPLE_IAP_KEY}}"\nkey_id = "{KEY_ID}"\n'
        f'issuer_id = "{ISSUER_ID}"\napi_base_url = "{world.apple.url}"\n')
    runner, env = CliRunner(), {"APPLE_IAP_KEY": PEM.decode()}
    common = ["--config", str(config), "--database-url", world.p.db_url]

    dry = runner.invoke(cli, ["reconcile", "apple", "--dry-run", *common], env=env)
    assert dry.exit_code == 0, dry.output
    assert "would recover 2 notifications, 0 already logged" in dry.stdout
    result = runner.invoke(cli, ["reconcile", "apple", "--json", *common], env=env)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["app_id"], body["recovered"], body["mode"], body["recovered_ids"]) == (
        APPLE_APP, 2, "failures", ["n-renew", "n-off"])
    daily = runner.invoke(cli, ["reconcile", "apple", "--all", "--app", APPLE_APP, *common], env=env)
    assert daily.exit_code == 0 and "recovered 0 notifications, 4 already logged" in daily.stdout

    refreshed = runner.invoke(cli, ["reconcile", "apple", "--subscription", OTID, "--json", *common], env=env)
    assert refreshed.exit_code == 0, refreshed.output
    assert (json.loads(refreshed.stdout)["recovered"], json.loads(refreshed.stdout)["subscription"]) == (0, OTID)

    unknown = runner.invoke(cli, ["reconcile", "apple", "--app", "nope", *common], env=env)
    assert unknown.exit_code == 2 and "has no In-App Purchase key" in unknown.stderr
    refused = runner.invoke(cli, ["reconcile", "apple", *common], env={"APPLE_IAP_KEY": make_key()[1].decode()})
    assert refused.exit_code == 1 and "refused the In-App Purchase key" in refused.stderr
    assert "Traceback" not in refused.output
    not_a_key = runner.invoke(cli, ["reconcile", "apple", *common], env={"APPLE_IAP_KEY": "-----BEGIN nonsense"})
    assert not_a_key.exit_code == 2 and "api_key: not an In-App Purchase key" in not_a_key.stderr
    missing = runner.invoke(cli, ["reconcile", "apple", "--subscription", "999", *common], env=env)
    assert missing.exit_code == 1 and "knows no transaction '999'" in missing.stderr


def test_a_record_that_does_not_verify_is_refused_and_never_ingested(world: World) -> None:
    world.push(skip=DROPPED)
    forged = tamper(world.notes[2].signed_payload, notificationUUID="n-forged")
    world.apple.records.append(Record(forged, ms(world.notes[2].at) + 1, True))
    world.apple.throttle = 0
    first = world.run()
    assert (first["recovered"], first["refused"], first["refused_ids"]) == (2, 1, ["n-forged"])
    with psycopg.connect(world.p.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log WHERE external_id = 'n-forged'").fetchone() == (0,)


def test_credentials_are_checked_before_any_call(tmp_path: Path) -> None:
    root = write_root(tmp_path)
    base = {"environments": [PROD], "key_id": KEY_ID, "issuer_id": ISSUER_ID}
    with pytest.raises(ConfigError, match=r"api_key.*No such file"):
        settings_module.from_dict(config_dict(root, api_key=str(tmp_path / "missing.p8"), **base))
    with pytest.raises(ConfigError, match="go together"):
        settings_module.from_dict(config_dict(root, key_id=KEY_ID))
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    settings = settings_module.from_dict(config_dict(root, api_key=rsa_pem.decode(), **base))
    with pytest.raises(ConfigError, match="not an In-App Purchase key"):
        from_settings(settings.apps[APPLE_APP].apple, BUNDLE_ID)


# -- the --subscription mapping, on its own (pure: no Apple, no database) --------------------------


def test_recover_subscription_states_only_what_the_log_lacks_and_is_idempotent(tmp_path: Path) -> None:
    settings = settings_module.from_dict(config_dict(write_root(tmp_path), environments=[PROD]))
    adapter = build_sources(settings).apple[BUNDLE_ID]
    now = datetime.now(UTC).replace(microsecond=0)
    bought, renewed, refunded = now - timedelta(days=40), now - timedelta(days=10), now - timedelta(days=2)
    signed = {
        "t1": sign(txn("t1", bought), CA),
        "t2": sign(transaction(transaction_id="t2", purchase=renewed, expires=renewed + timedelta(days=30),
                               environment=PROD, revocationDate=ms(refunded), revocationReason=1), CA),
    }
    txns = [adapter.verified_transaction(PROD, jws) for jws in signed.values()]
    pushed = adapter.parse(note("n-buy", "SUBSCRIBED", "INITIAL_BUY", bought, txn=txn("t1", bought)).body)

    found = apple_source.recover_subscription(adapter.config, PROD, txns, pushed.events, signed_transactions=signed,
                                              status=5)
    assert [r.notification.external_id for r in found] == ["-transaction:t2", "-refund:t2"]
    renewal, refund = (r.notification.events for r in found)
    assert [(e.type, e.transaction_id, e.occurred_at) for e in renewal] == [("renewal", "t2", renewed)]
    # the refund of a period that had not ended: the refund, and access ends at the revocation
    assert [(e.type, e.occurred_at, e.price) for e in refund] == [
        ("refund", refunded, Decimal("-9.99")), ("expiration", refunded, None)]
    assert json.loads(found[0].raw)["signedTransactionInfo"] == signed["t2"]
    logged = [*pushed.events, *renewal, *refund]
    assert apple_source.recover_subscription(adapter.config, PROD, txns, logged, signed_transactions=signed,
                                             status=5) == []
    # the Sandbox verifier is not configured: a transaction from there is refused, never mapped
    with pytest.raises(BadSignature, match="environment 'Sandbox' is not accepted"):
        adapter.verified_transaction("Sandbox", signed["t1"])
