"""One transaction per ingest: idempotent, atomic, ordered per subscription, late events re-folded."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from subledger.core.events import parse_event
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
APP = "com.example"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),
                                          Destination(name="rudder", app_id=APP))})


def item(eid: str, kind: str, hours_ago: float, sub: str = "sub1", **extra: Any) -> Incoming:
    data: dict[str, Any] = {
        "id": eid, "app_id": APP, "type": kind, "subscription_id": sub, "app_user_id": "u1",
        "occurred_at": (NOW - timedelta(hours=hours_ago)).isoformat(),
    }
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price="9.99", currency="USD")
    data.update(extra)
    return Incoming(Notification.of(parse_event(data)), b"{}")


LIFECYCLE = [
    item("a1", "purchase", 60, period_type="trial"),
    item("a2", "renewal", 50),
    item("a3", "renewal", 40),
    item("a4", "auto_renew_disabled", 30),
    item("a5", "expiration", 20),
]
EXPECTED = ["trial_started", "trial_converted", "renewal", "cancellation", "expiration"]


def kinds(conn: psycopg.Connection, *, live_only: bool = True) -> list[str]:
    where = "WHERE superseded_at IS NULL" if live_only else ""
    return [r[0] for r in conn.execute(f"SELECT kind FROM transitions {where} ORDER BY occurred_at")]


def counts(conn: psycopg.Connection) -> tuple[int, int, int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM event_log), (SELECT count(*) FROM transitions),"
        " (SELECT count(*) FROM outbox), (SELECT count(*) FROM subscriptions)"
    ).fetchone()
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def test_lifecycle_in_order_derives_and_enqueues(conn: psycopg.Connection) -> None:
    for it in LIFECYCLE:
        ingest(conn, [it], POLICY, NOW)
    assert kinds(conn) == EXPECTED
    assert counts(conn) == (5, 5, 10, 1)  # one outbox row per transition per destination
    status = conn.execute("SELECT status FROM subscriptions").fetchone()
    assert status == ("expired",)


def test_shuffled_batch_equals_sorted_batch(conn: psycopg.Connection, db_url: str) -> None:
    shuffled = LIFECYCLE[:]
    random.Random(7).shuffle(shuffled)
    outcomes = ingest(conn, shuffled, POLICY, NOW)
    assert all(o.result == "new" for o in outcomes)
    assert kinds(conn, live_only=False) == EXPECTED


@pytest.mark.parametrize("late", range(len(LIFECYCLE)))
def test_late_event_refolds_and_ends_like_in_order(conn: psycopg.Connection, late: int) -> None:
    """Each event delivered last: the live transitions end up exactly those of the in-order fold."""
    order = [e for i, e in enumerate(LIFECYCLE) if i != late] + [LIFECYCLE[late]]
    for it in order:
        ingest(conn, [it], POLICY, NOW)
    assert kinds(conn) == EXPECTED
    superseded = {r[0] for r in conn.execute("SELECT id FROM transitions WHERE superseded_at IS NOT NULL")}
    # A superseded transition's undelivered messages were withdrawn from the outbox.
    in_outbox = {r[0] for r in conn.execute("SELECT DISTINCT transition_id FROM outbox")}
    assert not superseded & in_outbox
    assert len(in_outbox) == 5


def test_late_trial_start_supersedes_initial_purchase(conn: psycopg.Connection) -> None:
    ingest(conn, [item("b2", "renewal", 10, sub="s2")], POLICY, NOW)
    assert kinds(conn) == ["renewal"]
    ingest(conn, [item("b1", "purchase", 20, sub="s2", period_type="trial")], POLICY, NOW)
    assert kinds(conn) == ["trial_started", "trial_converted"]
    assert sorted(kinds(conn, live_only=False)) == ["renewal", "trial_converted", "trial_started"]
    superseded = conn.execute("SELECT kind FROM transitions WHERE superseded_at IS NOT NULL").fetchall()
    assert superseded == [("renewal",)]


def test_same_event_ten_times_eight_concurrently(db_url: str) -> None:
    event = item("dup", "purchase", 1)
    start = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with psycopg.connect(db_url) as c:
                start.wait()
                results.extend(o.result for o in ingest(c, [event], POLICY, NOW))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(db_url) as c:
        for _ in range(2):
            results.extend(o.result for o in ingest(c, [event], POLICY, NOW))
        assert not errors
        assert sorted(results) == ["duplicate"] * 9 + ["new"]
        assert counts(c) == (1, 1, 2, 1)
        receipts = c.execute("SELECT count(*) FROM duplicate_receipts").fetchone()
        assert receipts == (9,)


BIG_BATCH = LIFECYCLE + [item(f"big{i}", "purchase", 1, sub=f"big{i}") for i in range(40)]


@pytest.mark.parametrize("point", ["after_log_insert", "after_derive", "before_commit"])
@pytest.mark.parametrize("batch", [LIFECYCLE, BIG_BATCH], ids=["pipelined", "copy"])
def test_failure_inside_the_transaction_leaves_nothing(
    conn: psycopg.Connection, point: str, batch: list[Incoming]
) -> None:
    """Small batches write in one statement at the end, big ones COPY the log first: both roll back whole."""

    class Injected(Exception):
        pass

    def fail(at: str) -> None:
        if at == point:
            if len(batch) > 32 and at == "after_log_insert":
                written = conn.execute("SELECT count(*) FROM event_log").fetchone()
                assert written == (len(batch),)  # the log rows really were inserted before the failure
            raise Injected(at)

    with pytest.raises(Injected):
        ingest(conn, batch, POLICY, NOW, fail_at=fail)
    assert counts(conn) == (0, 0, 0, 0)
    head = conn.execute("SELECT position FROM log_head").fetchone()
    assert head == (0,)
    # and the same batch then goes through whole
    ingest(conn, batch, POLICY, NOW)
    n = len(batch)
    assert counts(conn) == (n, n, 2 * n, n - 4)


def test_historical_events_record_but_do_not_publish(conn: psycopg.Connection) -> None:
    old = [item("h1", "purchase", 24 * 30, sub="old"), item("h2", "renewal", 24 * 10, sub="old")]
    ingest(conn, old, POLICY, NOW)  # older than the 72 h horizon
    explicit = Incoming(item("h3", "purchase", 1, sub="new").notification, b"{}", historical=True)
    ingest(conn, [explicit], POLICY, NOW)
    assert kinds(conn) == ["initial_purchase", "renewal", "initial_purchase"]
    assert counts(conn)[2] == 0
    flags = [r[0] for r in conn.execute("SELECT historical FROM event_log ORDER BY position")]
    assert flags == [True, True, True]
    opted_in = IngestPolicy(destinations={APP: (Destination(name="s", app_id=APP, publish_historical=True),)})
    ingest(conn, [item("h4", "auto_renew_disabled", 24 * 5, sub="old")], opted_in, NOW)
    assert counts(conn)[2] == 1


def test_disabled_event_and_sandbox_are_not_enqueued(conn: psycopg.Connection) -> None:
    from subledger.core.lifecycle import TransitionKind
    from subledger.core.render import DEFAULT_EVENT_NAMES

    names = {**DEFAULT_EVENT_NAMES, TransitionKind.RENEWAL: ""}
    policy = IngestPolicy(destinations={APP: (Destination(name="s", app_id=APP, event_names=names),)})
    ingest(conn, [item("d1", "purchase", 3), item("d2", "renewal", 2)], policy, NOW)
    ingest(conn, [item("d3", "purchase", 1, sub="sb", environment="sandbox")], policy, NOW)
    events = [r[0] for r in conn.execute("SELECT body->0->>'event' FROM outbox ORDER BY id")]
    assert events == ["rc_initial_purchase_event"]


def test_settle_delay_holds_messages(conn: psycopg.Connection) -> None:
    policy = IngestPolicy(destinations=POLICY.destinations, settle_delay={APP: timedelta(seconds=30)})
    ingest(conn, [item("s1", "purchase", 1)], policy, NOW)
    available = conn.execute("SELECT min(available_at) FROM outbox").fetchone()
    assert available is not None and available[0] == NOW + timedelta(seconds=30)


def test_settle_delay_is_one_rule_for_ingest_replay_and_retry(conn: psycopg.Connection) -> None:
    """Every path that makes a row due (ingest, a replay re-enqueueing it, `outbox retry`) waits the same."""
    from subledger.outbox import ops
    from subledger.outbox.replay import replay

    delay = timedelta(seconds=45)
    policy = IngestPolicy(destinations=POLICY.destinations, settle_delay={APP: delay})
    ingest(conn, [item("d1", "purchase", 1)], policy, NOW)
    later = NOW + timedelta(minutes=10)
    conn.execute("DELETE FROM outbox WHERE destination = 'rudder'")  # lost: replay enqueues it again
    conn.execute("UPDATE outbox SET status = 'dead', attempts = 1, first_attempt_at = %s", (NOW,))
    conn.commit()
    replay(conn, policy, later)
    with conn.transaction():
        ops.retry(conn, policy, later, dead=True)
    due = dict(conn.execute("SELECT destination, available_at FROM outbox").fetchall())
    assert due == {"rudder": later + delay, "segment": later + delay}


def test_messages_are_rendered_into_the_outbox(conn: psycopg.Connection) -> None:
    ingest(conn, LIFECYCLE[:2], POLICY, NOW)
    row = conn.execute(
        "SELECT message_id, subscriber, body FROM outbox WHERE destination = 'segment' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert row is not None
    message_id, subscriber, body = row
    track, identify = body
    assert track["messageId"] == message_id and track["type"] == "track"
    assert track["event"] == "rc_trial_converted_event" and track["userId"] == "u1" == subscriber
    assert track["properties"]["revenue"] == 9.99 and track["properties"]["currency"] == "USD"
    assert identify["traits"] == {"subscription_status": "active", "last_seen_app_user_id": "u1"}


def test_scheduler_inferred_expiration_follows_the_historical_rule(conn: psycopg.Connection) -> None:
    """Inferred for a period that ended 10 days ago (history): state only. Ended 30 h ago: published."""
    from subledger.core.lifecycle import inferred_expiration
    from subledger.store.projections import load_state

    ingest(conn, [item("x1", "purchase", 24 * 40, sub="late", expires_at=(NOW - timedelta(days=10)).isoformat()),
                  item("x2", "purchase", 24 * 20, sub="due", expires_at=(NOW - timedelta(hours=30)).isoformat())],
           POLICY, NOW)
    expiries = []
    for sub in ("late", "due"):
        state = load_state(conn, f"{APP}/other/{sub}")
        assert state is not None
        expiries.append(inferred_expiration(state, NOW, timedelta(hours=24)))
    expiry, on_time = expiries
    assert expiry is not None and on_time is not None
    outcomes = ingest(conn, [Incoming(Notification.of(expiry), b"{}")], POLICY, NOW)
    assert outcomes[0].result == "new" and len(outcomes[0].transitions) == 1
    assert kinds(conn) == ["initial_purchase", "initial_purchase", "expiration"]
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)  # history: nothing published
    ingest(conn, [Incoming(Notification.of(on_time), b"{}")], POLICY, NOW)
    published = [r[0] for r in conn.execute("SELECT body->0->>'event' FROM outbox ORDER BY id")]
    assert published == ["rc_expiration_event", "rc_expiration_event"]  # two destinations, the purchase was history
    again = ingest(conn, [Incoming(Notification.of(expiry), b"{}")], POLICY, NOW)
    assert again[0].result == "duplicate"


def test_a_revived_transition_is_enqueued_again_only_when_not_delivered(conn: psycopg.Connection) -> None:
    """Rule 3 both ways: an inferred expiration supersedes a cancellation; a renewal that turns up
    later (but happened before) makes the inference a no-op, and the cancellation is live again.
    Its messages were delivered meanwhile, so the revival queues nothing (rule 2: one message per
    fact); a revived transition whose messages were not delivered is queued again, from its body."""
    from subledger.core.lifecycle import inferred_expiration
    from subledger.store.projections import load_state

    def run(sub: str, *, deliver: bool) -> tuple[str, list[str]]:
        period_end = NOW - timedelta(hours=30)
        ingest(conn, [item(f"{sub}-p", "purchase", 24 * 2, sub=sub, expires_at=period_end.isoformat())], POLICY, NOW)
        ingest(conn, [item(f"{sub}-c", "auto_renew_disabled", 29, sub=sub)], POLICY, NOW)
        row = conn.execute("SELECT id FROM transitions WHERE kind = 'cancellation' AND subscription_key = %s",
                           (f"{APP}/other/{sub}",)).fetchone()
        assert row is not None
        cancellation = str(row[0])
        if deliver:  # what the relay does on a 2xx
            conn.execute(
                "INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber, body,"
                " attempts, created_at, delivered_at) SELECT message_id, transition_id, destination, app_id,"
                " subscriber, body, 1, created_at, %s FROM outbox WHERE transition_id = %s", (NOW, cancellation))
            conn.execute("DELETE FROM outbox WHERE transition_id = %s", (cancellation,))
            conn.commit()
        state = load_state(conn, f"{APP}/other/{sub}")
        assert state is not None
        expiry = inferred_expiration(state, NOW, timedelta(hours=1))
        assert expiry is not None
        ingest(conn, [Incoming(Notification.of(expiry), b"{}")], POLICY, NOW)
        gone = conn.execute("SELECT superseded_at IS NOT NULL FROM transitions WHERE id = %s", (cancellation,))
        assert gone.fetchone() == (True,)
        ingest(conn, [item(f"{sub}-r", "renewal", 31, sub=sub, expires_at=(NOW + timedelta(days=20)).isoformat())],
               POLICY, NOW)
        live = conn.execute("SELECT superseded_at IS NULL FROM transitions WHERE id = %s", (cancellation,))
        assert live.fetchone() == (True,)
        queued = [r[0] for r in conn.execute("SELECT message_id FROM outbox WHERE transition_id = %s ORDER BY id",
                                             (cancellation,))]
        return cancellation, queued

    _, queued = run("revived-delivered", deliver=True)
    assert queued == []
    cancellation, queued = run("revived-pending", deliver=False)
    assert len(queued) == 2  # one per destination, withdrawn when superseded, queued again now
    bodies = [r[0] for r in conn.execute("SELECT body->0->'properties'->>'event_id' FROM outbox"
                                         " WHERE transition_id = %s", (cancellation,))]
    assert bodies == ["revived-pending-c", "revived-pending-c"]
