"""One event per transaction: subledger's ingest against a bare insert loop and the `eventsourcing` library.

All three run in this process, taking turns over slices of the same events (so load drifting on a
shared machine weighs on each alike), on the same PostgreSQL server, each into a fresh database,
one event per transaction:

- subledger: `ingest()` of one canonical event (validate, append to the hash chain, fold, render
  the Segment messages, write log + projection + transitions + outbox rows);
- bare: a psycopg loop inserting the same log and outbox rows, nothing derived;
- the peer: `eventsourcing`'s `Application.save` of an aggregate with one new event (its
  PostgreSQL recorder: an optimistic-concurrency insert of the stored event, plus the notification
  log), the per-event work of a general event-sourcing library. It is an optional extra
  (`pip install -e '.[bench]'`); without it the row says so and the bench goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from bench.common import Report, bare_database, fresh_database, times, write_config
from bench.generate import APP, events

Step = Callable[[int, dict[str, Any], bytes], None]  # (1-based number, event, its raw JSON)
ROUNDS = 5


@contextmanager
def subledger_writer() -> Iterator[Step]:
    from subledger.app import settings as settings_module
    from subledger.app.bootstrap import build
    from subledger.app.canonical import Rejection, to_incoming
    from subledger.outbox.ingest import ingest

    config = settings_module.load(write_config(APP))
    url = fresh_database("subledger_bench_tx")
    services = build(config, database_url=url)
    with psycopg.connect(url) as conn:
        def step(n: int, item: dict[str, Any], raw: bytes) -> None:
            incoming = to_incoming(item, raw, config)
            assert not isinstance(incoming, Rejection)
            ingest(conn, [incoming], services.policy, datetime.now(UTC), notify=False)

        yield step


@contextmanager
def bare_writer() -> Iterator[Step]:
    url = bare_database("subledger_bench_tx_bare")
    with psycopg.connect(url) as conn:
        def step(n: int, item: dict[str, Any], raw: bytes) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO event_log (position, source, external_id, app_id, kind, subscription_key,"
                    " app_user_id, occurred_at, received_at, raw, facts, hash)"
                    " VALUES (%s, 'custom', %s, %s, %s, %s, %s, %s, now(), %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    (n, item["id"], item["app_id"], item["type"], item["subscription_id"], item.get("app_user_id"),
                     item["occurred_at"], raw, raw.decode(), hashlib.sha256(raw).digest()),
                )
                conn.execute(
                    "INSERT INTO outbox (message_id, transition_id, destination, app_id, subscriber, body,"
                    " available_at, created_at) VALUES (%s, %s, 'segment', %s, %s, %s, now(), now())",
                    (f"m{n}", f"t{n}", item["app_id"], item.get("app_user_id") or "anon", raw.decode()),
                )

        yield step


@contextmanager
def eventsourcing_writer() -> Iterator[Step | None]:
    """`eventsourcing`'s Application, one new event per save; None when the library is not installed."""
    try:
        from eventsourcing.application import Application
        from eventsourcing.domain import Aggregate, event
    except ImportError:
        yield None
        return

    class Subscription(Aggregate):
        @event("Started")
        def __init__(self, key: str, fact: dict[str, Any]) -> None:
            self.key = key
            self.facts = [fact]

        @event("Fact")
        def record(self, fact: dict[str, Any]) -> None:
            self.facts.append(fact)

    url = fresh_database("subledger_bench_peer", migrated=False)
    info = psycopg.conninfo.conninfo_to_dict(url)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(info.get("dbname", "postgres")),
        "POSTGRES_HOST": str(info.get("host", "127.0.0.1")),
        "POSTGRES_PORT": str(info.get("port", "5432")),
        "POSTGRES_USER": str(info.get("user", "postgres")),
        "POSTGRES_PASSWORD": str(info.get("password", "")),
        "CREATE_TABLE": "y",
    }
    app: Any = Application(env=env)
    aggregates: dict[str, Any] = {}

    def step(n: int, item: dict[str, Any], raw: bytes) -> None:
        fact = {k: v for k, v in item.items() if isinstance(v, str)}
        aggregate = aggregates.get(item["subscription_id"])
        if aggregate is None:
            aggregate = aggregates[item["subscription_id"]] = Subscription(item["subscription_id"], fact)
        else:
            aggregate.record(fact)
        app.save(aggregate)

    try:
        yield step
        if aggregates:  # what was saved reads back
            check: UUID = next(iter(aggregates.values())).id
            assert app.repository.get(check).key
    finally:
        app.close()


def interleaved(writers: dict[str, Step], items: list[dict[str, Any]], raws: list[bytes]) -> dict[str, float]:
    """Events per second of each writer, the events fed in ROUNDS slices taking turns (A B C, A B C,
    ...), so a shared machine's load drifting during the section weighs on every side alike."""
    spent = dict.fromkeys(writers, 0.0)
    size = max(1, -(-len(items) // ROUNDS))
    for begin in range(0, len(items), size):
        for name, step in writers.items():
            started = time.perf_counter()
            for n in range(begin, min(begin + size, len(items))):
                step(n + 1, items[n], raws[n])
            spent[name] += time.perf_counter() - started
    return {name: len(items) / seconds for name, seconds in spent.items()}


def run(report: Report, count: int) -> None:
    items = list(events(count, seed=7))
    raws = [json.dumps(i, separators=(",", ":")).encode() for i in items]
    with subledger_writer() as ours_step, bare_writer() as bare_step, eventsourcing_writer() as peer_step:
        writers = {"ours": ours_step, "bare": bare_step}
        if peer_step is not None:
            writers["peer"] = peer_step
        rates = interleaved(writers, items, raws)
    ours, bare = rates["ours"], rates["bare"]
    report.add("per event", f"ingest(), {count:,}\nevents, 1 per\ntransaction", f"{ours:,.0f} events/s",
               f"bare insert loop\n(log + outbox)\n{bare:,.0f} events/s", times(ours / bare), "-")
    peer = rates.get("peer")
    if peer is None:
        report.add("per event", "the same", f"{ours:,.0f} events/s",
                   "eventsourcing:\nnot installed\n(pip install -e\n'.[bench]')", "-", "≥ 2x")
        return
    report.add("per event", "the same", f"{ours:,.0f} events/s",
               f"eventsourcing\nApplication.save\n1 event per save\n{peer:,.0f} saves/s", times(ours / peer),
               "≥ 2x", ours >= 2 * peer)
