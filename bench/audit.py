"""Audit query speed at scale: `audit timeline` for one subscriber, `audit stats` for the last 24 h
(counted on the tables' indexes) and for 30 whole UTC days (read from the rollups).

The log is filled by `subledger ingest` (about ten events per subscription, every transition
rendered into the outbox), then a tenth of the outbox is moved to `outbox_delivered` with its
attempts, as the relay would have, so the delivery joins and latency percentiles have real rows.
Times are server-side: the sum of EXPLAIN ANALYZE execution times of the statements each command
runs (exactly the statements of `subledger.store.audit`), median of 20 runs; a timeline run picks a
different subscriber each time. The timeline's plans are also checked for a sequential scan of
`event_log`.

Then the console's pages on the same log, in process (FastAPI's TestClient against `create_app`,
`Authorization: Bearer`, as tests/test_console.py asks them): each page once to warm up, then
CONSOLE_RUNS timed requests, each naming a different subscriber, message or entry where the page
takes one; wall time of the whole request (routing, queries, template), median and max. Around the
timed requests the event log's `seq_scan` counter in pg_stat_user_tables must not move (every
connection that read it is closed first, so its backend has flushed its counts).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.common import Report, fresh_database, out_dir, times, write_config
from bench.generate import APP, write_ndjson
from bench.ingest import _cli
from subledger.store import audit, rollups

RUNS = 20
TIMELINE_TARGET_MS = 50.0
STATS_TARGET_MS = 2000.0
CONSOLE_RUNS = 10
CONSOLE_TARGET_MS = 500.0  # issue 13: "fast on a log of 1,000,000 events"
TOKEN = "bench-console-token"


def _explain(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params).fetchone()
    assert row is not None
    plan = row[0][0]
    return float(plan["Execution Time"]), plan["Plan"]


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _seq_scans(plan: dict[str, Any], table: str) -> int:
    return sum(1 for n in _nodes(plan) if n.get("Node Type") == "Seq Scan" and n.get("Relation Name") == table)


def _timeline_ms(conn: psycopg.Connection, who: str) -> tuple[float, int]:
    """(server ms, sequential scans of event_log) for the statements `audit.timeline` runs."""
    total, seq = 0.0, 0
    ms, plan = _explain(conn, audit.RESOLVE_SQL, {"who": who})
    total += ms
    seq += _seq_scans(plan, "event_log")
    keys = audit.resolve(conn, who)
    for sql in (audit.ENTRIES_SQL, audit.TRANSITIONS_SQL):
        ms, plan = _explain(conn, sql, {"keys": keys})
        total += ms
        seq += _seq_scans(plan, "event_log")
    ids = [r[0] for r in conn.execute(audit.TRANSITIONS_SQL, {"keys": keys}).fetchall()] + [f"link:{k}" for k in keys]
    ms, plan = _explain(conn, audit.DELIVERIES_SQL, {"ids": ids})
    return total + ms, seq + _seq_scans(plan, "event_log")


def _stats_ms(conn: psycopg.Connection, since: datetime, until: datetime) -> float:
    """Server time of what `audit.stats` runs over [since, until): the rollups' statements when both
    are UTC midnights, else the counts on the tables' time indexes."""
    params: dict[str, Any] = {"since": since, "until": until, "now": datetime.now(UTC)}
    days = rollups.whole_days(since, until)
    if days is not None:
        params |= days.params()
    return sum(_explain(conn, sql, params)[0] for sql in (audit.STATS_SQL if days is None else audit.STATS_DAYS_SQL))


def _deliver_tenth(conn: psycopg.Connection) -> int:
    """What the relay leaves behind for delivered rows: outbox_delivered + one attempt each."""
    with conn.transaction():
        conn.execute(
            """
            WITH gone AS (
              DELETE FROM outbox WHERE id % 10 = 0
              RETURNING message_id, transition_id, destination, app_id, subscriber, body, created_at
            )
            INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber, body,
              attempts, created_at, first_attempt_at, delivered_at, status_code)
            SELECT message_id, transition_id, destination, app_id, subscriber, body, 1, created_at,
              created_at + interval '50 ms', created_at + (random() * interval '2 s'), 200
            FROM gone
            """
        )
        conn.execute(
            "INSERT INTO outbox_attempts (message_id, attempted_at, status_code, outcome, response)"
            " SELECT message_id, delivered_at, 200, 'delivered', '{\"success\":true}' FROM outbox_delivered"
        )
    row = conn.execute("SELECT count(*) FROM outbox_delivered").fetchone()
    return int(row[0]) if row else 0


def _seq_scans_of_log(url: str) -> int:
    """event_log's cumulative `seq_scan` counter, on a fresh connection (so a fresh statistics
    snapshot), a second after the last reader closed: a backend flushes its counts as it exits."""
    time.sleep(1.0)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'event_log'").fetchone()
    return int(row[0]) if row else 0


Request = tuple[str, str | None]  # (path and query, the redirect's Location when a 303 is the answer)


def _console_requests(conn: psycopg.Connection, rng: random.Random, n: int) -> list[tuple[str, str, list[Request]]]:
    """(page, what it is asked, n requests) per page; each request names a different subscriber,
    message or log entry where the page takes one. Picked by point lookups (keys, message ids,
    the log's primary key), so picking reads no table whole."""
    rows = conn.execute("SELECT key, app_user_id FROM subscriptions ORDER BY key").fetchall()
    users = rng.sample([(str(k), str(u)) for k, u in rows if u is not None], n)
    # every lifecycle but perhaps the cut-off last one has a first renewal, `<subscription id>-t1`
    keys = rng.sample([str(k) for k, _ in rows[:-1]], n)
    messages: list[str] = []
    for i in range(n):
        table = "outbox" if i % 2 == 0 else "outbox_delivered"  # waiting and delivered, alternately
        sql = f"SELECT message_id FROM {table} WHERE message_id >= %s ORDER BY message_id LIMIT 1"
        row = (conn.execute(sql, (f"sl-{rng.getrandbits(32):08x}",)).fetchone()  # past the last: the first
               or conn.execute(sql, ("",)).fetchone())
        assert row is not None, f"no message in {table}"
        messages.append(str(row[0]))
    top = conn.execute("SELECT max(position) FROM event_log").fetchone()
    positions = [rng.randint(1, int(top[0])) for _ in range(n)] if top and top[0] else []
    return [
        ("overview", "/console", [("/console", None)] * n),
        ("search", "app user id", [(f"/console/search?q={u}", f"/console/subscribers/{u}") for _, u in users]),
        ("search", "subscription id",
         [(f"/console/search?q={k.rsplit('/', 1)[1]}", f"/console/subscribers/{k}") for k in keys]),
        ("search", "store transaction id",
         [(f"/console/search?q={k.rsplit('/', 1)[1]}-t1", f"/console/subscribers/{k}") for k in keys]),
        ("search", "messageId", [(f"/console/search?q={m}", f"/console/messages/{m}") for m in messages]),
        ("subscriber", "by app user id", [(f"/console/subscribers/{u}", None) for _, u in users]),
        ("entry", "payload viewer", [(f"/console/entries/{p}", None) for p in positions]),
        ("deliveries", "newest 100", [("/console/deliveries", None)] * n),
        ("message", "payload, attempts", [(f"/console/messages/{m}", None) for m in messages]),
        ("explain", "from a messageId", [(f"/console/explain/{m}", None) for m in messages]),
    ]


def _ms(value: float) -> str:
    return f"{value:,.1f} ms" if value < 10 else f"{value:,.0f} ms"


def console_pages(report: Report, url: str, count: int) -> None:
    """Time the console's pages on the bench log in process; check none of them scans event_log."""
    from fastapi.testclient import TestClient

    from subledger.app import settings
    from subledger.app.bootstrap import build
    from subledger.app.http import create_app

    with psycopg.connect(url, autocommit=True) as conn:
        pages = _console_requests(conn, random.Random(13), CONSOLE_RUNS + 1)
    config = settings.from_dict({"api_token": TOKEN, "apps": {APP: {"destinations": {"segment": {
        "write_key": "bench", "endpoint": "http://127.0.0.1:9", "publish_historical": True}}}}})
    app = create_app(build(config, database_url=url))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    before = _seq_scans_of_log(url)
    measured: list[tuple[str, str, list[float], list[str]]] = []
    with TestClient(app, follow_redirects=False) as client:
        for page, what, requests in pages:
            took: list[float] = []
            wrong: list[str] = []
            for i, (path, location) in enumerate(requests):
                start = time.perf_counter()
                answer = client.get(path, headers=bearer)
                elapsed = (time.perf_counter() - start) * 1000
                if i:  # the first request warms up (pool connections, templates, caches)
                    took.append(elapsed)
                want = 200 if location is None else 303
                if answer.status_code != want or (location is not None and answer.headers.get("location") != location):
                    wrong.append(f"{path}: HTTP {answer.status_code} {answer.headers.get('location', '')}".strip())
            measured.append((page, what, took, wrong))
    scans = _seq_scans_of_log(url) - before  # the pool is closed: every page's backend has exited
    total = 0
    for page, what, took, wrong in measured:
        total += len(took) + 1
        median, worst = statistics.median(took), max(took)
        met = median < CONSOLE_TARGET_MS and not wrong
        report.add(
            "console", f"{page}\n{what}", f"median {_ms(median)}\nmax {_ms(worst)}", "-",
            f"{times(median / CONSOLE_TARGET_MS)}\nof target" + (f"\n{len(wrong)} WRONG" if wrong else ""),
            f"median\n< {CONSOLE_TARGET_MS:.0f} ms", met,
        )
        for problem in wrong[:3]:
            report.note(f"console {page} ({what}): {problem}")
    report.add("console", f"event_log\nseq scans over\n{total} requests", f"{scans}", "-", "-", "0", scans == 0)
    report.note(f"console pages: in process (TestClient, bearer token) on the {count:,}-event audit log,"
                f" {CONSOLE_RUNS} timed requests per page after one warm-up, wall time of the whole request")


def run(report: Report, quick: bool) -> None:
    count = 50_000 if quick else 1_000_000
    path = str(out_dir() / f"events-{count}.ndjson")
    if not os.path.exists(path):
        write_ndjson(path, count)
    url = fresh_database("subledger_bench_audit")
    config = write_config(APP)
    seconds, _, out = _cli(["ingest", path, "--config", str(config), "--database-url", url, "--json"])
    summary = json.loads(out)
    with psycopg.connect(url, autocommit=True) as conn:
        delivered = _deliver_tenth(conn)
        conn.execute("VACUUM ANALYZE")
        subs = conn.execute("SELECT count(*) FROM subscriptions").fetchone()
        users = [r[0] for r in conn.execute(
            "SELECT app_user_id FROM subscriptions WHERE app_user_id IS NOT NULL ORDER BY key").fetchall()]
        report.console.print(
            f"  audit: {summary['new']:,} events ({count / seconds:,.0f}/s), {subs[0] if subs else 0:,} subscriptions,"
            f" {summary['transitions']:,} transitions, {delivered:,} delivered rows", highlight=False)
        rng = random.Random(5)
        picks = rng.sample(users, RUNS)
        runs = [_timeline_ms(conn, who) for who in picks]
        timeline = statistics.median(ms for ms, _ in runs)
        seq = sum(s for _, s in runs)
        day_end = datetime.now(UTC) + timedelta(minutes=1)
        stats = statistics.median(_stats_ms(conn, day_end - timedelta(days=1), day_end) for _ in range(RUNS))
        today = rollups.Days.ending(datetime.now(UTC).date(), 30)
        stats_days = statistics.median(_stats_ms(conn, today.since, today.until) for _ in range(RUNS))
    report.add(
        "audit",
        f"audit timeline\none subscriber,\n{count:,} events\nmedian of {RUNS}\n{seq} seq scans",
        f"{timeline:.2f} ms\nserver time", "-",
        f"{timeline / TIMELINE_TARGET_MS:.2f}x\nof target" + ("" if seq == 0 else "\nSEQ SCAN"),
        f"< {TIMELINE_TARGET_MS:.0f} ms", timeline < TIMELINE_TARGET_MS and seq == 0,
    )
    report.add(
        "audit",
        f"audit stats\na day of\n{count:,} events\nmedian of {RUNS}",
        f"{stats:,.0f} ms\nserver time", "-", f"{stats / STATS_TARGET_MS:.2f}x\nof target",
        f"< {STATS_TARGET_MS:,.0f} ms", stats < STATS_TARGET_MS,
    )
    report.add(
        "audit",
        f"audit stats\n30 whole UTC days\n(rollups)\nmedian of {RUNS}",
        f"{stats_days:,.1f} ms\nserver time", "-", f"{stats_days / STATS_TARGET_MS:.3f}x\nof target",
        f"< {STATS_TARGET_MS:,.0f} ms", stats_days < STATS_TARGET_MS,
    )
    console_pages(report, url, count)
