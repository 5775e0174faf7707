"""The parallel import writes exactly what a single-process ingest writes, whatever `--jobs`.

A generated file (subscriptions interleaved, facts arriving late across batches so subscriptions
are re-folded and transitions superseded, repeats within a batch and across batches, rejected
lines, one-time purchases whose subscription the parent cannot guess) is imported three ways into
three databases: by `outbox.ingest.ingest` batch by batch (the ingest every other path runs), by
the bulk import with one job (in this process) and with three worker processes. Every column of
every table, hashes and the outbox's ids included, must be equal; `verify` must pass; a second
import must find every line a duplicate and change nothing but the receipts. Both with one chain
and with the log partitioned into three chains.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from subledger.app import settings as settings_module
from subledger.app.bootstrap import Services, build
from subledger.app.bulk_import import Partition, import_ndjson
from subledger.app.ingest_summary import canonical_line
from subledger.core.chain import GENESIS
from subledger.core.events import parse_event
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, ingest
from subledger.store import bulk, log
from subledger.store.db import with_database
from subledger.store.rows import encoder
from subledger.store.verify import verify

NOW = datetime(2026, 11, 28, 12, 0, 0, 250000, tzinfo=UTC)
APP = "com.example"
BATCH = 250
TABLES = ("event_log", "log_head", "log_heads", "log_epochs", "duplicate_receipts", "subscriptions",
          "transitions", "outbox")


def settings() -> settings_module.Settings:
    return settings_module.from_dict({"apps": {APP: {"destinations": {
        "segment": {"write_key": "k", "publish_historical": False},
        "warehouse": {"write_key": "w", "publish_historical": True},
    }}}})


def services(url: str) -> Services:
    return build(settings(), database_url=url, clock=lambda: NOW)


def lines(seed: int = 3, subscriptions: int = 120) -> list[bytes]:
    """NDJSON lines: lifecycles interleaved, some facts late, repeats, refusals, one-time purchases."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for s in range(subscriptions):
        at = NOW - timedelta(days=rng.randint(1, 200), minutes=rng.randint(0, 900))
        base: dict[str, Any] = {"app_id": APP, "subscription_id": f"sub-{s}", "store": rng.choice(
            ["app_store", "play_store", "STRIPE", None])}
        if rng.random() < 0.8:
            base["app_user_id"] = f"user-{s % 90}"
        kinds = ["purchase"] + ["renewal"] * rng.randint(1, 6) + [rng.choice(
            ["auto_renew_disabled", "billing_issue", "refund", "expiration"])]
        for n, kind in enumerate(kinds):
            event = {**base, "id": f"s{s}-{n}", "type": kind, "occurred_at": at.isoformat()}
            if kind in ("purchase", "renewal"):
                event.update(product_id="monthly", price="9.99", currency="USD",
                             expires_at=(at + timedelta(days=30)).isoformat(), transaction_id=f"s{s}-t{n}")
            events.append({k: v for k, v in event.items() if v is not None})
            at += timedelta(days=30)
    for n in range(15):  # one-time purchases: no subscription id, a stream of their own
        events.append({"id": f"otp-{n}", "app_id": APP, "type": "one_time_purchase", "product_id": "coins",
                       "price": "1.99", "currency": "EUR", "transaction_id": f"otp-t{n}",
                       "occurred_at": (NOW - timedelta(hours=n)).isoformat()})
    # Interleave subscriptions but keep most facts in order; move some earlier facts later (late facts).
    rng.shuffle(events)
    events.sort(key=lambda e: e["occurred_at"] if rng.random() < 0.9 else "9999")
    out = [json.dumps(e).encode() for e in events]
    for _ in range(40):  # repeats: within a batch and across batches
        at = rng.randrange(len(out))
        out.insert(min(len(out), at + rng.choice([3, BATCH * 2])), out[at])
    for bad in (b"{not json", json.dumps({"id": "x", "app_id": APP, "type": "nope"}).encode(),
                json.dumps({"id": "y", "app_id": "unknown.app", "type": "purchase", "subscription_id": "q",
                            "occurred_at": NOW.isoformat()}).encode(), b"[1, 2]"):
        out.insert(rng.randrange(1, len(out)), bad)
    return out


@pytest.fixture
def databases(pg_server: str, template_db: str) -> Iterator[Callable[[], str]]:
    """Fresh migrated databases, as many as the test asks for."""
    made: list[str] = []

    def make() -> str:
        name = f"sl_b_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Identifier(template_db)))
        made.append(name)
        return with_database(pg_server, name)

    yield make
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for name in made:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every column of every table an import writes, in a stable order."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(url) as conn:
        for table in TABLES:
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            out[table] = sorted(rows, key=repr)
    return out


def sequential(url: str, data: list[bytes]) -> None:
    """The reference: `ingest` over the same batches of lines, one transaction each."""
    svc = services(url)
    with psycopg.connect(url) as conn:
        texts = [t for t in (line.strip() for line in data) if t]
        for at in range(0, len(texts), BATCH):
            items = [c for t in texts[at:at + BATCH]
                     if isinstance(c := canonical_line(t, svc.settings, historical=False), Incoming)]
            ingest(conn, items, svc.policy, NOW, notify=False)


def partition(url: str, chains: int) -> None:
    if chains > 1:
        with psycopg.connect(url) as conn:
            log.set_chains(conn, chains, NOW - timedelta(days=400))
            conn.commit()


@pytest.mark.parametrize("chains", [1, 3])
def test_parallel_import_equals_jobs_1_and_the_sequential_ingest(databases: Callable[[], str], chains: int) -> None:
    data = lines()
    text = b"\n".join(data) + b"\n"
    reference, inline, parallel = databases(), databases(), databases()
    for url in (reference, inline, parallel):
        partition(url, chains)
    sequential(reference, data)
    one = import_ndjson(services(inline), io.BytesIO(text), "f", jobs=1, batch=BATCH)
    three = import_ndjson(services(parallel), io.BytesIO(text), "f", jobs=3, batch=BATCH)

    assert one == three
    assert one.rejected == 4 and one.duplicate >= 40 and one.transitions > 0
    expected = snapshot(reference)
    assert snapshot(inline) == expected
    assert snapshot(parallel) == expected
    assert len(expected["event_log"]) == one.new
    assert {row[-1] for row in expected["event_log"]} == {"import"}  # arrival, the last column
    for url in (reference, parallel):
        with psycopg.connect(url) as conn:
            result = verify(conn)
            assert result.ok, result.problems[:3]

    again = import_ndjson(services(parallel), io.BytesIO(text), "f", jobs=3, batch=BATCH)
    assert (again.new, again.duplicate, again.transitions) == (0, one.new + one.duplicate, 0)
    after = snapshot(parallel)
    assert len(after.pop("duplicate_receipts")) == len(expected["duplicate_receipts"]) + again.duplicate
    assert after == {t: rows for t, rows in expected.items() if t != "duplicate_receipts"}


def test_a_late_fact_in_a_worker_refolds_from_the_committed_history(databases: Callable[[], str]) -> None:
    """A worker reads history on its own connection: what earlier batches committed."""
    events = [{"id": f"e{n}", "app_id": APP, "type": kind, "subscription_id": "s", "store": "app_store",
               "occurred_at": (NOW - timedelta(hours=10 - n)).isoformat(), "product_id": "p", "price": "1",
               "currency": "USD"} for n, kind in enumerate(["purchase", "renewal", "renewal"])]
    late = {**events[1], "id": "late", "type": "billing_issue",
            "occurred_at": (NOW - timedelta(hours=8, minutes=30)).isoformat()}
    text = b"\n".join(json.dumps(e).encode() for e in [*events, late]) + b"\n"
    urls = databases(), databases()
    for url, jobs in zip(urls, (1, 2), strict=True):
        import_ndjson(services(url), io.BytesIO(text), "f", jobs=jobs, batch=3)  # the late fact: batch 2
    assert snapshot(urls[0]) == snapshot(urls[1])
    with psycopg.connect(urls[1]) as conn:
        kinds = [k for (k,) in conn.execute("SELECT kind FROM transitions WHERE superseded_at IS NULL "
                                            "ORDER BY occurred_at")]
    assert "billing_issue" in kinds


def _entries() -> list[log.Entry]:
    out = []
    for n in range(12):
        event = parse_event({"id": f"e{n % 9}", "app_id": APP, "type": "purchase", "subscription_id": f"s{n % 4}",
                             "occurred_at": (NOW - timedelta(minutes=n)).isoformat(), "price": "2.50",
                             "product_id": "p", "currency": "EUR", "app_user_id": None if n % 3 else f"u\t{n}\\"})
        out.append(log.Entry(Notification.of(event), f"raw\n{n}".encode(), NOW, n % 2 == 0, "import"))
    return out


@pytest.mark.parametrize("chains", [1, 3])
def test_parts_and_chain_are_log_plan_cut_at_the_hash(chains: int) -> None:
    """`entry_parts` + `chain` give exactly `log.plan`'s positions, hashes, rows and heads."""
    tips = {c: (7 * chains + c, bytes([c]) * 32) for c in range(chains)} if chains > 1 else {0: (7, GENESIS)}
    head = log.Head(tips, frozenset({("custom", "e1")}), chains)
    entries = _entries()
    results, writes = log.plan(entries, head)
    positions, rows, ours = bulk.chain([bulk.entry_parts(e) for e in entries], head, NOW)

    assert positions == [r.position if isinstance(r, log.Appended) else None for r in results]
    assert ours.heads == writes.heads and ours.duplicates == writes.duplicates
    order = [log.COLUMNS.index(c) for c in bulk.LOG_COLUMNS]
    encode = encoder([log.TYPES[i] for i in order])
    assert rows == [encode([row[i] for i in order]).encode() for row in writes.rows]


def test_a_failing_worker_stops_the_import_and_rolls_its_batch_back(
    databases: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's exception reaches the parent (raised there, not a hang); batches before it stay."""
    original = Partition.derive

    def failing(self: Partition, now: datetime, assigned: Any, *rest: Any) -> Any:
        if any(line > 4 for line, _ in assigned):
            raise ValueError("boom in a worker")
        return original(self, now, assigned, *rest)

    monkeypatch.setattr(Partition, "derive", failing)  # the forked workers inherit it
    text = b"".join(json.dumps({"id": f"e{n}", "app_id": APP, "type": "purchase", "subscription_id": f"s{n}",
                                "product_id": "p", "occurred_at": NOW.isoformat()}).encode() + b"\n"
                    for n in range(8))
    url = databases()
    with pytest.raises(ValueError, match="boom in a worker"):
        import_ndjson(services(url), io.BytesIO(text), "f", jobs=2, batch=4)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (4,)
        assert conn.execute("SELECT count(*) FROM transitions").fetchone() == (4,)
        assert verify(conn).ok


def test_a_worker_that_cannot_reach_the_database_is_a_store_error(
    databases: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI turns a StoreError into one line: a worker's outage must arrive as one, not a RuntimeError."""
    import os

    from subledger.app import bulk_import
    from subledger.core.errors import StoreUnavailable

    parent, real = os.getpid(), bulk_import.connect

    def connect(url: str, **kwargs: Any) -> psycopg.Connection:
        if os.getpid() != parent:
            raise StoreUnavailable("cannot connect to the database at test: connection refused; is it running?")
        return real(url, **kwargs)

    monkeypatch.setattr(bulk_import, "connect", connect)
    line = json.dumps({"id": "e", "app_id": APP, "type": "purchase", "subscription_id": "s", "product_id": "p",
                       "occurred_at": NOW.isoformat()}).encode()
    url = databases()
    with pytest.raises(StoreUnavailable, match="connection refused"):
        import_ndjson(services(url), io.BytesIO(line + b"\n"), "f", jobs=2)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (0,)
