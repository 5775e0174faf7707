"""Shared bench plumbing: a database server, fresh databases, a config file, a results table."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from subledger.store import migrate
from subledger.store.db import recreate_database, resolve_url

OUT = Path(os.environ.get("SUBLEDGER_BENCH_DIR", tempfile.gettempdir())) / "subledger-bench"


def server_url() -> str:
    """SUBLEDGER_BENCH_DATABASE_URL, else SUBLEDGER_DATABASE_URL, else the embedded server."""
    return resolve_url(os.environ.get("SUBLEDGER_BENCH_DATABASE_URL"))


def fresh_database(name: str, *, migrated: bool = True) -> str:
    url = recreate_database(server_url(), name)
    if migrated:
        migrate.upgrade(url)
    return url


def write_config(app_id: str, endpoint: str = "http://127.0.0.1:9") -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "bench.toml"
    path.write_text(
        f'[apps."{app_id}".destinations.segment]\nwrite_key = "bench"\nendpoint = "{endpoint}"\n'
        "publish_historical = true\n"
    )
    return path


@dataclass
class Report:
    console: Console = field(default_factory=Console)
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def add(self, section: str, measure: str, ours: str, baseline: str, ratio: str) -> None:
        self.rows.append((section, measure, ours, baseline, ratio))
        self.console.print(f"  {section}: {measure}: {ours} vs {baseline} → {ratio}", highlight=False)

    def print(self) -> None:
        table = Table(title="subledger bench (measured side by side in this run)")
        for column in ("section", "measure", "subledger", "baseline", "ratio / target"):
            table.add_column(column)
        for row in self.rows:
            table.add_row(*row)
        self.console.print(table)
