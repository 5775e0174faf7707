"""Group commit (outbox/group_commit.py): concurrent ingests share transactions and keep every guarantee.

The scenario the burst issue names: 32 concurrent clients of the real HTTP service send overlapping
duplicates and out-of-order events of shared subscriptions. Afterwards `verify` passes, every event
is stored once (and exactly one request was told "new" for it), and the live transitions, the
projections and the outbox's messages equal a sequential ingest of the same events, sorted, into a
second database.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import psycopg.sql
import pytest
from live_server import Served

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.http import create_app
from subledger.core.events import parse_event
from subledger.core.sources import Notification
from subledger.outbox.group_commit import GroupCommit
from subledger.outbox.ingest import Incoming, ingest
from subledger.store.db import Pool, with_database
from subledger.store.verify import verify

NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)  # injected: the service's clock, never the calendar
APP = "com.burst.app"
TOKEN = "burst-token"
CLIENTS = 32


def _settings() -> settings_module.Settings:
    return settings_module.from_dict({"api_token": TOKEN, "apps": {APP: {"destinations": {"segment": {
        "write_key": "k", "endpoint": "http://127.0.0.1:9"}}}}})


def _event(sub: int, k: int) -> dict[str, Any]:
    """Subscription `sub`'s k-th fact: a trial, renewals, then (for some) a cancellation."""
    at = NOW - timedelta(hours=48) + timedelta(hours=k * 6, minutes=sub)
    kind = "purchase" if k == 0 else ("auto_renew_disabled" if k == 4 and sub % 3 == 0 else "renewal")
    data: dict[str, Any] = {"id": f"s{sub}-e{k}", "app_id": APP, "type": kind, "subscription_id": f"s{sub}",
                            "app_user_id": f"u{sub}", "occurred_at": at.isoformat()}
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price="9.99", currency="USD",
                    expires_at=(at + timedelta(hours=6)).isoformat())
    if k == 0:
        data["period_type"] = "trial"
    return data


EVENTS = [_event(sub, k) for sub in range(24) for k in range(5)]


@pytest.fixture
def second_db(pg_server: str, template_db: str) -> Iterator[str]:
    name = f"sl_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(name), psycopg.sql.Identifier(template_db)))
    yield with_database(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


class Service(Served):
    """The production app on the injected clock, served by uvicorn in a thread."""

    def __init__(self, database_url: str) -> None:
        super().__init__(create_app(build(_settings(), database_url=database_url, clock=lambda: NOW), pool_size=4))


def _live(conn: psycopg.Connection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    transitions = conn.execute(
        "SELECT id, kind, subscription_key, occurred_at FROM transitions WHERE superseded_at IS NULL ORDER BY id"
    ).fetchall()
    outbox = conn.execute("SELECT message_id, destination, body FROM outbox ORDER BY message_id").fetchall()
    states = conn.execute("SELECT key, status, state FROM subscriptions ORDER BY key").fetchall()
    return transitions, outbox, states


def test_32_clients_with_duplicates_and_shuffled_order_equal_a_sequential_fold(db_url: str, second_db: str) -> None:
    rng = random.Random(11)
    sends = [e for e in EVENTS for _ in range(2)] + rng.sample(EVENTS, 30)  # every event twice, some thrice
    rng.shuffle(sends)  # out of order within subscriptions, duplicates racing each other
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()
    with Service(db_url) as service:
        def client(share: list[dict[str, Any]]) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{service.port}",
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
                for event in share:
                    response = http.post("/v1/events", json=event)
                    assert response.status_code == 200, response.text
                    with lock:
                        answers.append(response.json())

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, [sends[i::CLIENTS] for i in range(CLIENTS)]))
        committer: GroupCommit = service.app.state.committer
        transactions, requests = committer.transactions, committer.requests

    assert requests == len(sends)
    assert transactions < requests, "no two requests ever shared a transaction"
    new = Counter(a["id"] for a in answers if a["result"] == "new")
    assert new == Counter(e["id"] for e in EVENTS), "each event is new exactly once"
    assert Counter(a["result"] for a in answers)["duplicate"] == len(sends) - len(EVENTS)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT external_id) FROM event_log").fetchone() == (
            len(EVENTS), len(EVENTS))
        checked = verify(conn)
        assert checked.ok, checked.problems
        concurrent = _live(conn)

    policy = build(_settings(), database_url=second_db).policy
    ordered = sorted(EVENTS, key=lambda e: e["occurred_at"])
    with psycopg.connect(second_db) as conn:
        for event in ordered:  # one event per transaction, in occurrence order: the reference fold
            ingest(conn, [Incoming(Notification.of(parse_event(event)), b"{}")], policy, NOW)
        sequential = _live(conn)
    assert concurrent[0] == sequential[0]
    assert len(concurrent[0]) >= len(EVENTS) - 8  # the scenario does produce transitions
    # the same messages (ids, destinations, events); their counters (renewal_number) are what was known
    # when each was first rendered, which depends on arrival order: a messageId never gets a second payload
    assert [(m, d, b[0]["event"]) for m, d, b in concurrent[1]] == [(m, d, b[0]["event"]) for m, d, b in sequential[1]]
    assert concurrent[2] == sequential[2]  # projections: the fold of the log, whatever the arrival order


def _incoming(event_id: str, sub: str) -> Incoming:
    return Incoming(Notification.of(parse_event({
        "id": event_id, "app_id": APP, "type": "purchase", "subscription_id": sub, "app_user_id": "u",
        "occurred_at": (NOW - timedelta(hours=1)).isoformat(), "product_id": "m", "price": "1", "currency": "USD",
    })), b"{}")


def test_a_request_that_breaks_the_shared_transaction_fails_alone(db_url: str) -> None:
    """A bad request in a batch is re-run alone: its neighbours are stored and told so, it gets its error."""
    services = build(_settings(), database_url=db_url, clock=lambda: NOW)
    pool = Pool(db_url, max_size=2)
    pool.open(wait=True)
    committer = GroupCommit(pool, services.policy, services.clock)
    broken = Incoming(_incoming("bad", "sb").notification, None)  # type: ignore[arg-type]  # raw must be bytes
    start = threading.Barrier(9)
    results: dict[str, Any] = {}

    def submit(name: str, items: list[Incoming]) -> None:
        start.wait()
        try:
            results[name] = committer.ingest(items)
        except Exception as exc:
            results[name] = exc

    try:
        committer.start()
        threads = [threading.Thread(target=submit, args=(f"ok{i}", [_incoming(f"e{i}", f"s{i}")])) for i in range(8)]
        threads.append(threading.Thread(target=submit, args=("bad", [broken])))
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        committer.close()
        pool.close()
    assert isinstance(results["bad"], Exception)
    for i in range(8):
        (outcome,) = results[f"ok{i}"]
        assert (outcome.external_id, outcome.result) == (f"e{i}", "new")
    with psycopg.connect(db_url) as conn:
        ids = {r[0] for r in conn.execute("SELECT external_id FROM event_log")}
        assert ids == {f"e{i}" for i in range(8)}
        assert verify(conn).ok


def test_a_closed_committer_refuses_new_work_as_unavailable(db_url: str) -> None:
    """After shutdown a late caller gets a 503-kind error at once, never a hang."""
    from subledger.core.errors import StoreUnavailable

    services = build(_settings(), database_url=db_url, clock=lambda: NOW)
    pool = Pool(db_url, max_size=1)
    pool.open(wait=True)
    committer = GroupCommit(pool, services.policy, services.clock).start()
    (first,) = committer.ingest([_incoming("c1", "sc")])
    committer.close()
    pool.close()
    assert first.result == "new"
    with pytest.raises(StoreUnavailable):
        committer.ingest([_incoming("c2", "sc")])
