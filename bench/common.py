"""Shared bench plumbing: a database server, fresh databases, a config file, the knobs, a results table."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import psycopg.sql
from rich.console import Console
from rich.table import Table

from subledger.store import migrate
from subledger.store.db import recreate_database, resolve_url

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).parent / "subledger")


def out_dir() -> Path:
    """Where generated files, dumps and service logs go: SUBLEDGER_BENCH_DIR (else the temp dir)/subledger-bench."""
    path = Path(os.environ.get("SUBLEDGER_BENCH_DIR", tempfile.gettempdir())) / "subledger-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def quick() -> bool:
    """BENCH_QUICK=1: smaller sizes and short runs, a smoke run of about a minute."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def seconds() -> float:
    """How long each HTTP load runs: BENCH_SECONDS, else 15 (3 with BENCH_QUICK)."""
    value = os.environ.get("BENCH_SECONDS")
    return float(value) if value else (3.0 if quick() else 15.0)


def server_url() -> str:
    """SUBLEDGER_BENCH_DATABASE_URL, else SUBLEDGER_DATABASE_URL, else the embedded server."""
    return resolve_url(os.environ.get("SUBLEDGER_BENCH_DATABASE_URL"))


def database_name(name: str) -> str:
    """BENCH_DATABASE_PREFIX renames the bench's databases, so two runs on one server (the smoke
    test beside a `make bench`) never drop each other's."""
    prefix = os.environ.get("BENCH_DATABASE_PREFIX")
    return f"{prefix}_{name.removeprefix('subledger_')}" if prefix else name


def fresh_database(name: str, *, migrated: bool = True) -> str:
    url = recreate_database(server_url(), database_name(name))
    if migrated:
        migrate.upgrade(url)
    return url


def drop_databases() -> None:
    """Drop every database of this BENCH_DATABASE_PREFIX (the smoke test cleans up with it)."""
    prefix = os.environ.get("BENCH_DATABASE_PREFIX")
    if not prefix:
        return
    with psycopg.connect(server_url(), autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                            (prefix + "_",)).fetchall()]
        for name in names:
            drop = psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(psycopg.sql.Identifier(name)))


def write_config(app_id: str, endpoint: str = "http://127.0.0.1:9") -> Path:
    path = out_dir() / "bench.toml"
    path.write_text(
        f'[apps."{app_id}".destinations.segment]\nwrite_key = "bench"\nendpoint = "{endpoint}"\n'
        "publish_historical = true\n"
    )
    return path


def times(ratio: float) -> str:
    return f"{ratio:.2f}x"


@dataclass
class Report:
    """Every figure with its baseline, their ratio and the target; printed as one table at the end."""

    console: Console = field(default_factory=Console)
    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, section: str, measure: str, ours: str, baseline: str, ratio: str, target: str = "",
            met: bool | None = None) -> None:
        mark = "" if met is None else (" ok" if met else " MISSED")
        self.rows.append((section, measure, ours, baseline, ratio, target + mark))
        self.console.print(f"  {section}: {measure}: {ours} vs {baseline} → {ratio} ({target}{mark})",
                           highlight=False)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.console.print(f"  {text}", highlight=False)

    def print(self) -> None:
        table = Table(title="subledger bench (measured side by side in this run)", show_lines=False,
                      pad_edge=False, expand=False)
        for column in ("section", "measure", "subledger", "baseline", "ratio", "target"):
            table.add_column(column, overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        self.console.print(table)
        for text in self.notes:
            self.console.print(f"· {text}", highlight=False)
