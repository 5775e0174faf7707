"""`subledger ingest`: a file (or stdin) of canonical events or captured store bodies into the ledger.

The work is `app.stream_ingest` (the demo runs it too); this module reads the options, draws the
progress bar on a terminal and prints the summary.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import IO, Annotated, TypeVar

import typer

from subledger.app.bulk_import import MAX_JOBS, default_jobs
from subledger.app.cli.common import (
    ConfigOption,
    DatabaseOption,
    MigrateOption,
    err,
    fail,
    out,
    prepare_schema,
    services_for,
)
from subledger.app.progress import counting
from subledger.app.stream_ingest import ingest_stream
from subledger.core.errors import ConfigError, StoreError

T = TypeVar("T")


class InputFormat(StrEnum):
    canonical = "canonical"
    apple = "apple"
    stripe = "stripe"
    revenuecat = "revenuecat"
    google = "google"
    amazon = "amazon"


def _open(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise fail(f"{path}: {exc.strerror}") from None


def _with_progress(items: Iterator[T], stream: IO[bytes], *, enabled: bool) -> Iterator[T]:
    """A bar that counts events and events/s; it fills by bytes read when the stream's size is known."""
    if not enabled:
        yield from items
        return
    total: int | None = None
    try:
        total = os.fstat(stream.fileno()).st_size or None
    except (OSError, ValueError):
        total = None
    with counting(err, "ingesting", "events") as bar:
        task = bar.add_task("", total=total, count=0)
        n = 0
        for n, item in enumerate(items, 1):
            if n % 500 == 0:
                try:
                    position = stream.tell() if total else None
                except (OSError, ValueError):
                    position = None
                bar.update(task, completed=position or 0, count=n)
            yield item
        bar.update(task, completed=total or 0, count=n)


def _bar(items: Iterator[T], stream: IO[bytes]) -> Iterator[T]:
    return _with_progress(items, stream, enabled=True)


def ingest(
    file: Annotated[str, typer.Argument(help="NDJSON or JSON array of canonical events; - for stdin.")],
    historical: Annotated[
        bool, typer.Option("--historical", help="Record state and transitions without publishing.")
    ] = False,
    fmt: Annotated[
        InputFormat,
        typer.Option(
            "--format",
            help="canonical events, or captured store bodies, one per line: apple (verified as configured), "
            "stripe or revenuecat (trusted: captured bodies carry no signature header), google (Pub/Sub push "
            "bodies; the Play state stored in the line under subledger_fetched, else fetched now), amazon (SNS bodies, "
            "trusted; the RVS receipt stored in the line under subledger_fetched, else fetched now).",
        ),
    ] = InputFormat.canonical,
    app_id: Annotated[
        str | None,
        typer.Option("--app", help="With --format stripe|revenuecat: the app the bodies belong to "
                     "(default: the only app with that source configured)."),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Worker processes deriving canonical NDJSON, partitioned by "
                     f"subscription (default: the CPU count, at most {MAX_JOBS}; 1: all in this process)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    migrate: MigrateOption = None,
) -> None:
    """Ingest canonical events (or captured store bodies with --format); exits 1 when any item was rejected."""
    services = services_for(config, database_url)
    prepare_schema(services, migrate)
    stream = _open(file)
    try:
        summary = ingest_stream(
            services, stream, "<stdin>" if file == "-" else file, historical=historical,
            progress=_bar if sys.stderr.isatty() and not as_json else None, fmt=fmt.value, app_id=app_id,
            jobs=jobs or default_jobs(),
        )
    except (StoreError, ConfigError) as exc:
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
