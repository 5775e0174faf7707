"""Audit query speed at scale: `audit timeline` for one subscriber and `audit stats` for a day.

The log is filled by `subledger ingest` (about ten events per subscription, every transition
rendered into the outbox), then a tenth of the outbox is moved to `outbox_delivered` with its
attempts, as the relay would have, so the delivery joins and latency percentiles have real rows.
Times are server-side: the sum of EXPLAIN ANALYZE execution times of the statements each command
runs (exactly the statements of `subledger.store.audit`), median of 20 runs; a timeline run picks a
different subscriber each time. The timeline's plans are also checked for a sequential scan of
`event_log`.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.common import Report, fresh_database, out_dir, write_config
from bench.generate import APP, write_ndjson
from bench.ingest import _cli
from subledger.store import audit

RUNS = 20
TIMELINE_TARGET_MS = 50.0
STATS_TARGET_MS = 2000.0


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
    params = {"since": since, "until": until, "now": datetime.now(UTC)}
    return sum(_explain(conn, sql, params)[0] for sql in audit.STATS_SQL)


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
