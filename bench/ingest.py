"""The `subledger` command as a measured subprocess (time, peak RSS), and the memory bench.

Bulk import against COPY lives in bench/bulk.py, one event per transaction in bench/peer.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from bench.common import Report, fresh_database, out_dir, write_config
from bench.generate import APP, write_ndjson


def _cli(args: list[str]) -> tuple[float, int, str]:
    """Run `subledger ARGS`; return (seconds, peak RSS in bytes, stdout). Output goes to files, so a
    chatty command cannot fill a pipe and stall while we wait for it."""
    with tempfile.TemporaryFile(dir=out_dir()) as out, tempfile.TemporaryFile(dir=out_dir()) as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "subledger.app", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"subledger {' '.join(args)} failed: {err.read().decode()[-2000:]}")
        return elapsed, usage.ru_maxrss * 1024, out.read().decode()


def memory(report: Report, count: int) -> None:
    path = str(out_dir() / f"events-{count}.ndjson")
    if not os.path.exists(path):
        write_ndjson(path, count)
    config = write_config(APP)
    url = fresh_database("subledger_bench_mem")
    seconds, rss, _ = _cli(["ingest", path, "--config", str(config), "--database-url", url, "--json"])
    report.add("memory", f"peak RSS of\nsubledger ingest\n{count:,} events",
               f"{rss / 2**20:,.0f} MB\n{count / seconds:,.0f} events/s", "-", "-", "< 300 MB", rss < 300 * 2**20)
