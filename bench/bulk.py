"""Bulk import: `subledger ingest` of an NDJSON file against a bare COPY of the very rows it wrote.

The baseline's rows are subledger's own: after the import, the four tables it fills (event_log,
subscriptions, transitions, outbox) are dumped with COPY ... TO in binary, and the timed baseline
COPYs those pre-rendered rows into a fresh database of the same schema (same indexes), in one
transaction, as fast as PostgreSQL takes them. That is the storage limit on this machine: what an
import would cost if deriving, rendering and hashing were free. A COPY of the log rows alone is
printed beside it (the earlier bench's baseline).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.common import Report, bare_database, fresh_database, out_dir, times, write_config
from bench.generate import APP, write_ndjson
from bench.ingest import _cli

TABLES = ("event_log", "subscriptions", "transitions", "outbox")
CHUNK = 1 << 20


def _columns(conn: psycopg.Connection, table: str) -> list[str]:
    """The table's writable columns (generated ones are computed by COPY FROM itself)."""
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s"
        " AND is_generated = 'NEVER' ORDER BY ordinal_position", (table,)).fetchall()
    return [r[0] for r in rows]


def dump(url: str, directory: Path) -> dict[str, tuple[list[str], Path, int]]:
    """Each table's rows, in binary COPY format, as files: table → (columns, file, rows)."""
    out: dict[str, tuple[list[str], Path, int]] = {}
    with psycopg.connect(url) as conn:
        for table in TABLES:
            columns = _columns(conn, table)
            path = directory / f"dump-{table}.bin"
            cols = sql.SQL(", ").join(map(sql.Identifier, columns))
            statement = sql.SQL("COPY (SELECT {} FROM {} ORDER BY 1) TO STDOUT (FORMAT binary)").format(
                cols, sql.Identifier(table))
            with path.open("wb") as f, conn.cursor().copy(statement) as copy:
                for data in copy:
                    f.write(data)
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
            out[table] = (columns, path, int(count[0]) if count else 0)
    return out


def copy_in(url: str, dumps: dict[str, tuple[list[str], Path, int]], tables: tuple[str, ...]) -> float:
    """Seconds to COPY the dumped rows of `tables` into `url`, one transaction, commit included."""
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.transaction():
            for table in tables:
                columns, path, _ = dumps[table]
                cols = sql.SQL(", ").join(map(sql.Identifier, columns))
                statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(sql.Identifier(table), cols)
                with path.open("rb") as f, conn.cursor().copy(statement) as copy:
                    while data := f.read(CHUNK):
                        copy.write(data)
        return time.perf_counter() - started


def run(report: Report, count: int) -> None:
    path = out_dir() / f"events-{count}.ndjson"
    if not path.exists():
        write_ndjson(str(path), count)
    config = write_config(APP)
    url = fresh_database("subledger_bench_bulk")
    seconds, rss, out = _cli(["ingest", str(path), "--config", str(config), "--database-url", url, "--json"])
    summary = json.loads(out)
    ours = count / seconds
    dumps = dump(url, out_dir())
    all_seconds = copy_in(bare_database("subledger_bench_copy"), dumps, TABLES)
    log_seconds = copy_in(bare_database("subledger_bench_copy_log"), dumps, ("event_log",))
    rows = {t: n for t, (_, _, n) in dumps.items()}
    for name in (dumps[t][1] for t in TABLES):
        os.unlink(name)
    every = count / all_seconds
    log_only = count / log_seconds
    report.add("import", f"subledger ingest\n{count:,} events\n(NDJSON file)",
               f"{ours:,.0f} events/s\n{seconds:.1f} s\n{rss / 2**20:,.0f} MB peak RSS",
               f"COPY, same rows\ninto 4 tables:\n{every:,.0f} events/s\n{all_seconds:.1f} s",
               times(ours / every), "≥ 0.5x", ours >= 0.5 * every)
    report.note(f"import: {count:,} events made {summary['transitions']:,} transitions, {rows['outbox']:,} outbox rows "
                f"and {rows['subscriptions']:,} subscriptions; the COPY baseline writes exactly those rows")
    report.add("import", "the same import", f"{ours:,.0f} events/s",
               f"COPY of the log\nrows alone:\n{log_only:,.0f} rows/s\n{log_seconds:.1f} s",
               times(ours / log_only), "-")
