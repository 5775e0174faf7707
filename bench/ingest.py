"""Ingest benches: bulk against a bare COPY, per-event transactions against a bare insert loop, memory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import psycopg

from bench.common import OUT, Report, fresh_database, write_config
from bench.generate import APP, write_ndjson


def _cli(args: list[str]) -> tuple[float, int, str]:
    """Run `subledger ARGS`; return (seconds, peak RSS in bytes, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "subledger.app", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"subledger {' '.join(args)} failed: {err[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024, out


def _bare_copy(url: str, path: str) -> tuple[float, int]:
    """The same rows into a plain table by COPY: the ceiling for a Python client on this machine."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TABLE bare_log (position bigint PRIMARY KEY, source text, external_id text, app_id text,"
            " kind text, subscription_key text, app_user_id text, occurred_at timestamptz, received_at timestamptz,"
            " raw bytea, facts jsonb, hash bytea, UNIQUE (source, external_id))"
        )
        conn.commit()
        start = time.perf_counter()
        now = datetime.now(UTC)
        n = 0
        with open(path, "rb") as f, conn.cursor().copy(
            "COPY bare_log (position, source, external_id, app_id, kind, subscription_key, app_user_id,"
            " occurred_at, received_at, raw, facts, hash) FROM STDIN"
        ) as copy:
            copy.set_types(["int8", "text", "text", "text", "text", "text", "text", "text", "timestamptz",
                            "bytea", "text", "bytea"])
            for line in f:
                item = json.loads(line)
                n += 1
                copy.write_row((
                    n, "custom", item["id"], item["app_id"], item["type"], item["subscription_id"],
                    item.get("app_user_id"), item["occurred_at"], now, line.rstrip(), line.decode(),
                    hashlib.sha256(line).digest(),
                ))
        conn.commit()
        return time.perf_counter() - start, n


def bulk(report: Report, count: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = str(OUT / f"events-{count}.ndjson")
    if not os.path.exists(path):
        write_ndjson(path, count)
    config = write_config(APP)
    url = fresh_database("subledger_bench_bulk")
    seconds, _, out = _cli(["ingest", path, "--config", str(config), "--database-url", url, "--json"])
    summary = json.loads(out)
    ours = count / seconds
    bare_url = fresh_database("subledger_bench_copy", migrated=False)
    bare_seconds, n = _bare_copy(bare_url, path)
    baseline = n / bare_seconds
    report.add(
        "ingest bulk",
        f"{count:,} events (+{summary['transitions']:,} transitions, outbox rows), events/s",
        f"{ours:,.0f}/s",
        f"bare COPY {baseline:,.0f}/s",
        f"{ours / baseline:.2f}x (target ≥ 10,000/s)",
    )


def transactional(report: Report, count: int) -> None:
    from bench.generate import events
    from subledger.app import settings as settings_module
    from subledger.app.bootstrap import build
    from subledger.app.canonical import Rejection, to_incoming
    from subledger.outbox.ingest import ingest

    items = list(events(count, seed=7))
    raws = [json.dumps(i, separators=(",", ":")).encode() for i in items]
    config = settings_module.load(write_config(APP))

    url = fresh_database("subledger_bench_tx")
    services = build(config, database_url=url)
    with psycopg.connect(url) as conn:
        start = time.perf_counter()
        for item, raw in zip(items, raws, strict=True):
            incoming = to_incoming(item, raw, config)
            assert not isinstance(incoming, Rejection)
            ingest(conn, [incoming], services.policy, datetime.now(UTC), notify=False)
        ours = count / (time.perf_counter() - start)

    bare = fresh_database("subledger_bench_tx_bare")
    with psycopg.connect(bare) as conn:
        start = time.perf_counter()
        for n, (item, raw) in enumerate(zip(items, raws, strict=True), start=1):
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
        baseline = count / (time.perf_counter() - start)
    report.add(
        "ingest 1 event/tx",
        f"{count:,} events, one transaction each, events/s",
        f"{ours:,.0f}/s",
        f"bare insert loop {baseline:,.0f}/s",
        f"{ours / baseline:.2f}x (target ≥ 0.7)",
    )


def memory(report: Report, count: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = str(OUT / f"events-{count}.ndjson")
    if not os.path.exists(path):
        write_ndjson(path, count)
    config = write_config(APP)
    url = fresh_database("subledger_bench_mem")
    seconds, rss, _ = _cli(["ingest", path, "--config", str(config), "--database-url", url, "--json"])
    report.add(
        "ingest memory",
        f"peak RSS ingesting {count:,} events ({count / seconds:,.0f}/s)",
        f"{rss / 2**20:,.0f} MB",
        "-",
        "target < 300 MB",
    )
