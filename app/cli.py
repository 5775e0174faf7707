"""The `subledger` command line. Each command builds its services at run time (no work at import)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console

from subledger.core.errors import ConfigError, StoreError

app = typer.Typer(
    help="subledger: store notifications in, lifecycle events to Segment out, exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database management.", no_args_is_help=True)
app.add_typer(db_app, name="db")

err = Console(stderr=True)
out = Console()

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file (default: $SUBLEDGER_CONFIG).")
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="PostgreSQL URL (default: $SUBLEDGER_DATABASE_URL, else embedded)."),
]
BATCH = 1000
MAX_REJECTIONS_SHOWN = 20


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _services(config: Path | None, database_url: str | None) -> Any:
    from subledger.app import settings as settings_module
    from subledger.app.bootstrap import build

    try:
        loaded = settings_module.load(config)
        return build(loaded, database_url=database_url)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except StoreError as exc:
        raise fail(str(exc)) from None


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, database_url: DatabaseOption = None) -> None:
    """Apply the database migrations (serve and demo do this themselves)."""
    from subledger.store import migrate

    services = _services(config, database_url)
    migrate.upgrade(services.database_url)
    out.print(f"database at revision {migrate.current(services.database_url)}")


@dataclass
class Summary:
    new: int = 0
    duplicate: int = 0
    rejected: int = 0
    transitions: int = 0
    rejections: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "new": self.new,
            "duplicate": self.duplicate,
            "rejected": self.rejected,
            "transitions": self.transitions,
            "rejections": self.rejections,
        }


def _open(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise fail(f"{path}: {exc.strerror}") from None


def ingest_stream(services: Any, stream: IO[bytes], name: str, *, historical: bool, progress: bool) -> Summary:
    """Stream, validate and ingest in batches of 1,000, one transaction each."""
    from subledger.app.canonical import Rejection, to_incoming
    from subledger.app.reader import read_items
    from subledger.outbox.ingest import Incoming, ingest
    from subledger.store.db import connect

    summary = Summary()
    conn = connect(services.database_url)

    def flush(batch: list[Incoming]) -> None:
        if not batch:
            return
        for outcome in ingest(conn, batch, services.policy, services.clock()):
            if outcome.result == "new":
                summary.new += 1
                summary.transitions += len(outcome.transitions)
            else:
                summary.duplicate += 1
        batch.clear()

    def reject(line: int, reason: str) -> None:
        summary.rejected += 1
        if len(summary.rejections) < MAX_REJECTIONS_SHOWN:
            summary.rejections.append(f"{name}:{line}: {reason}")

    batch: list[Incoming] = []
    try:
        for item in _with_progress(read_items(stream), stream, enabled=progress):
            if item.error:
                reject(item.line, item.error)
                continue
            checked = to_incoming(item.value, item.raw, services.settings, historical=historical)
            if isinstance(checked, Rejection):
                where = f"{checked.field}: " if checked.field else ""
                reject(item.line, where + checked.reason)
                continue
            batch.append(checked)
            if len(batch) >= BATCH:
                flush(batch)
        flush(batch)
    finally:
        conn.close()
    return summary


def _with_progress(items: Iterator[Any], stream: IO[bytes], *, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    total: int | None = None
    try:
        import os

        total = os.fstat(stream.fileno()).st_size or None
    except (OSError, ValueError):
        total = None
    with Progress(
        TextColumn("ingesting"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task("ingest", total=total)
        for n, item in enumerate(items):
            if n % 500 == 0:
                try:
                    bar.update(task, completed=stream.tell())
                except (OSError, ValueError):
                    bar.update(task, advance=0)
            yield item


@app.command()
def ingest(
    file: Annotated[str, typer.Argument(help="NDJSON or JSON array of canonical events; - for stdin.")],
    historical: Annotated[
        bool, typer.Option("--historical", help="Record state and transitions without publishing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Ingest canonical events; exits 1 when any item was rejected."""
    from subledger.store import migrate

    services = _services(config, database_url)
    migrate.upgrade(services.database_url)
    stream = _open(file)
    try:
        summary = ingest_stream(
            services, stream, "<stdin>" if file == "-" else file,
            historical=historical, progress=sys.stderr.isatty() and not as_json,
        )
    except StoreError as exc:
        raise fail(str(exc)) from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if as_json:
        print(json.dumps(summary.as_json()))
    else:
        out.print(
            f"new {summary.new}, duplicate {summary.duplicate}, rejected {summary.rejected}, "
            f"transitions {summary.transitions}",
            highlight=False,
        )
        for line in summary.rejections:
            err.print(f"rejected {line}", highlight=False, markup=False)
        if summary.rejected > len(summary.rejections):
            err.print(f"... and {summary.rejected - len(summary.rejections)} more rejected", highlight=False)
    if summary.rejected:
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Run the HTTP service (canonical events, webhooks, health)."""
    import uvicorn

    from subledger.app.http import create_app
    from subledger.store import migrate

    services = _services(config, database_url)
    migrate.upgrade(services.database_url)
    uvicorn.run(create_app(services), host=host, port=port, log_level="info")


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the demo database afterwards.")] = True,
) -> None:
    """Run the whole pipeline on bundled samples: embedded PostgreSQL, ingest, timelines, messages."""
    from subledger.app.demo import run_demo

    try:
        run_demo(out)
    except StoreError as exc:
        raise fail(str(exc)) from None


@app.command()
def version() -> None:
    """Print the version."""
    from subledger.app.settings import package_version

    out.print(package_version())


def main() -> None:
    app()
