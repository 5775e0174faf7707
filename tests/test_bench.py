"""The bench's pieces on a tiny size, so `make bench` cannot rot between the runs that measure.

Each piece runs for real (a `subledger serve` subprocess, the sink process, the load generator,
`subledger ingest`, the COPY baseline, the per-event loops) against the tests' PostgreSQL server, in
databases of their own prefix, dropped at the end. Figures are not asserted (the machine is shared);
that every row is produced, and that the service answered every request, is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bulk, common, http, loadgen, peer, relay  # noqa: E402


@pytest.fixture(scope="module")
def bench_server(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The bench's knobs for this module: the tests' server, a prefix of our own, short loads, one
    serve worker; the databases (and the migrated template they are copied from) dropped at the end."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SUBLEDGER_BENCH_DATABASE_URL", pg_server)
        patch.setenv("BENCH_DATABASE_PREFIX", f"slb{os.getpid()}")
        patch.setenv("SUBLEDGER_BENCH_DIR", str(tmp_path_factory.mktemp("bench")))
        patch.setenv("BENCH_SECONDS", "0.5")
        patch.setenv("BENCH_WORKERS", "1")
        patch.delenv("BENCH_SERVE_ARGS", raising=False)
        try:
            yield
        finally:
            common.drop_databases()


@pytest.fixture
def bench_env(bench_server: None) -> common.Report:
    return common.Report()


def rows(report: common.Report, section: str) -> list[tuple[str, ...]]:
    return [r for r in report.rows if r[0] == section]


def test_percentiles_and_the_generator_ceiling() -> None:
    assert loadgen.percentile([0.003, 0.001, 0.002, 0.004, 0.005], 50) == 0.003
    assert loadgen.percentile([0.001] * 99 + [1.0], 99) == 0.001
    assert loadgen.percentile([0.001] * 98 + [1.0] * 2, 99) == 1.0
    result = loadgen.ceiling(4, 0.3, b'{"id":"x"}')
    assert result.errors == 0 and result.count > 100, result


def test_http_section_against_a_served_subledger(bench_env: common.Report) -> None:
    http.run(bench_env)
    measured = {r[1]: r for r in rows(bench_env, "http")}
    names = " | ".join(measured)
    for expected in ("load generator", "/v1/events\n1 client", "/v1/events\n32 clients", "apple (JWS)\n32 clients",
                     "received → sink"):
        assert expected in names, names
    for measure, row in measured.items():
        if "POST" in measure:
            # subledger and the bare baseline answered every request
            assert row[2].endswith("\n0 errors") and row[3].endswith("\n0 errors"), row
            assert float(row[4].rstrip("x")) > 0
    assert not [n for n in bench_env.notes if "errors" in n or "not at the sink" in n], bench_env.notes


def test_import_and_per_event_sections(bench_env: common.Report) -> None:
    bulk.run(bench_env, 200)
    peer.run(bench_env, 30)
    imported = rows(bench_env, "import")
    assert len(imported) == 2 and all(float(r[4].rstrip("x")) > 0 for r in imported), imported
    per_event = rows(bench_env, "per event")
    assert len(per_event) == 2, per_event
    assert "eventsourcing" in per_event[1][3]


def test_relay_section(bench_env: common.Report) -> None:
    relay.throughput(bench_env, 20, per_subscription=2)
    relay.latency(bench_env, 40.0, 0.5)
    measures = [r[1] for r in rows(bench_env, "relay")]
    assert len(measures) == 2 and measures[0].startswith("throughput") and measures[1].startswith("commit → sink")


def test_an_unknown_section_is_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "--only: unknown section(s) nope" in done.stderr
