"""Shared bench plumbing: a database server, fresh databases, a config file, the knobs, a results table."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import psycopg.sql
from rich import box
from rich.console import Console
from rich.table import Table

from subledger.store import migrate
from subledger.store.db import normalize_url, recreate_database, resolve_url, with_database

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
    return float(value) if value else (2.0 if quick() else 15.0)


def server_url() -> str:
    """SUBLEDGER_BENCH_DATABASE_URL, else SUBLEDGER_DATABASE_URL, else the embedded server."""
    return resolve_url(os.environ.get("SUBLEDGER_BENCH_DATABASE_URL"))


def database_name(name: str) -> str:
    """BENCH_DATABASE_PREFIX renames the bench's databases, so two runs on one server (the smoke
    test beside a `make bench`) never drop each other's."""
    prefix = os.environ.get("BENCH_DATABASE_PREFIX")
    return f"{prefix}_{name.removeprefix('subledger_')}" if prefix else name


_templates: dict[str, str] = {}


def _template(server: str) -> str:
    """A database migrated once per run (per server and prefix); fresh ones are copies of it, which
    costs a file copy instead of a migration."""
    name = database_name("subledger_bench_template")
    if _templates.get(server) != name:
        migrate.upgrade(recreate_database(server, name))
        _templates[server] = name
    return name


def fresh_database(name: str, *, migrated: bool = True) -> str:
    """A new empty database `name` on the bench's server; with `migrated`, of the current schema."""
    server = server_url()
    if not migrated:
        return recreate_database(server, database_name(name))
    template = _template(server)
    target = database_name(name)
    with psycopg.connect(normalize_url(server), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(target)))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(target), psycopg.sql.Identifier(template)))
    return with_database(server, target)


def bare_database(name: str) -> str:
    """`fresh_database(name)` with every trigger of subledger's tables switched off (the rollups'
    and the append-only guards): a baseline writes the same rows with nothing kept beside them."""
    url = fresh_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT DISTINCT event_object_table FROM information_schema.triggers WHERE trigger_schema = 'public'")]
        for table in tables:
            conn.execute(psycopg.sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(psycopg.sql.Identifier(table)))
    return url


def drop_databases() -> None:
    """Drop every database of this BENCH_DATABASE_PREFIX (the smoke test cleans up with it)."""
    prefix = os.environ.get("BENCH_DATABASE_PREFIX")
    if not prefix:
        return
    _templates.clear()
    with psycopg.connect(normalize_url(server_url()), autocommit=True) as conn:
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
    """A ratio as `0.47x`; a small one keeps two significant digits (`0.0031x`), never a bare `0.00x`."""
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def flat(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Report:
    """Every figure with its baseline, their ratio and the target; printed as one table at the end.

    Cells hold short lines (a figure per line), so the table fits an 80-column terminal; each row is
    also printed on one line as it is measured."""

    console: Console = field(default_factory=Console)
    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, section: str, measure: str, ours: str, baseline: str, ratio: str, target: str = "",
            met: bool | None = None) -> None:
        mark = "" if met is None else ("\nok" if met else "\nMISSED")
        self.rows.append((section, measure, ours, baseline, ratio, (target or "-") + mark))
        self.console.print(f"  {section}: {flat(measure)}: {flat(ours)} vs {flat(baseline)} → {ratio}"
                           f" ({flat(target + mark)})", highlight=False)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.console.print(f"  {text}", highlight=False)

    def table(self) -> Table:
        table = Table(title="subledger bench: measured side by side in this run", box=box.SIMPLE_HEAD,
                      pad_edge=False, show_edge=False)
        for column in ("measure", "subledger", "baseline", "ratio", "target"):
            table.add_column(column, overflow="fold")
        section = None
        for name, *cells in self.rows:
            if name != section:
                if section is not None:
                    table.add_row()
                table.add_row(f"[bold]{name}[/bold]")
                section = name
            mark = cells[4].rsplit("\n", 1)
            if len(mark) == 2 and mark[1] in ("ok", "MISSED"):
                cells[4] = f"{mark[0]}\n[{'green' if mark[1] == 'ok' else 'red'}]{mark[1]}[/]"
            table.add_row(*cells)
        return table

    def print(self) -> None:
        self.console.print(self.table())
        for text in self.notes:
            self.console.print(f"· {text}", highlight=False)
