"""The `subledger` command line. Each command builds its services at run time (no work at import)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any, TypeVar

import typer
from rich.console import Console

from subledger.app import cli_maintenance, cli_retention
from subledger.app.cli_audit import audit_app
from subledger.app.cli_outbox import outbox_app
from subledger.core.errors import ConfigError, StoreError

app = typer.Typer(
    help="subledger: store notifications in, lifecycle events to Segment out, exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(outbox_app, name="outbox")
app.command("replay")(cli_maintenance.replay)
app.command("verify")(cli_maintenance.verify)
app.command("prune")(cli_retention.prune)

err = Console(stderr=True, soft_wrap=True)  # a line stays one line when piped
out = Console(soft_wrap=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file (default: $SUBLEDGER_CONFIG).")
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="PostgreSQL URL (default: $SUBLEDGER_DATABASE_URL, else embedded)."),
]
BATCH = 1000
T = TypeVar("T")
MAX_REJECTIONS_SHOWN = 20


def fail(message: str, code: int = 2) -> typer.Exit:
    from rich.markup import escape

    # One line whatever the width (no wrapping when piped); the message is text, never markup.
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
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


MigrateOption = Annotated[
    bool | None,
    typer.Option("--migrate/--no-migrate", help="At start, migrate a schema that is behind: --migrate always "
                 "tries, --no-migrate never does; default (setting `migrate`): only when this role owns the schema."),
]


def _prepare_schema(services: Any, migrate_flag: bool | None) -> None:
    """serve/relay/ingest: run on a current schema; migrate only when allowed or told to (one line if not)."""
    from subledger.store import migrate

    chosen = services.settings.migrate if migrate_flag is None else migrate_flag
    try:
        done = migrate.prepare(services.database_url, migrate=chosen, timeout=services.database_timeout)
    except StoreError as exc:
        raise fail(str(exc)) from None
    if "migrated" in done:
        err.print(done, highlight=False)


@db_app.command("status")
def db_status(as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False) -> None:
    """Is the embedded PostgreSQL running? Its data directory and URL (never starts it)."""
    import os

    from subledger.store import embedded
    from subledger.store.db import display_url

    found = embedded.status()
    configured = os.environ.get("SUBLEDGER_DATABASE_URL")
    if as_json:
        print(json.dumps({"running": found.running, "pid": found.pid, "data_dir": str(found.data_dir),
                          "url": found.url, "database_url": display_url(configured) if configured else None}))
        return
    state = f"running (pid {found.pid})" if found.running else "not running"
    out.print(f"embedded PostgreSQL: {state}", highlight=False)
    out.print(f"data directory: {found.pgdata}", highlight=False)
    if found.url:
        out.print(f"url: {found.url}", highlight=False, soft_wrap=True)
    if configured:
        out.print(f"note: SUBLEDGER_DATABASE_URL is set, so commands use {display_url(configured)}, "
                  "not the embedded server", highlight=False, soft_wrap=True)
    elif not found.running:
        out.print("it starts on the next command that needs a database (e.g. `subledger db upgrade`)",
                  highlight=False, soft_wrap=True)


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL cleanly (a fast shutdown; it starts again when next needed)."""
    from subledger.store import embedded

    try:
        stopped = embedded.stop()
    except TimeoutError as exc:
        raise fail(str(exc), 1) from None
    where = embedded.status().pgdata
    out.print(f"stopped the embedded PostgreSQL ({where})" if stopped
              else f"the embedded PostgreSQL is not running ({where})", highlight=False)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, database_url: DatabaseOption = None) -> None:
    """Apply the database migrations (run as the schema owner; serve, relay and ingest check the revision)."""
    from subledger.store import migrate

    services = _services(config, database_url)
    try:
        migrate.upgrade(services.database_url, timeout=services.database_timeout)
        revision = migrate.current(services.database_url, timeout=services.database_timeout)
    except StoreError as exc:
        raise fail(str(exc)) from None
    out.print(f"database at revision {revision}")


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


def ingest_stream(
    services: Any, stream: IO[bytes], name: str, *, historical: bool, progress: bool,
    fmt: str = "canonical", app_id: str | None = None,
) -> Summary:
    """Stream, validate and ingest in batches of 1,000, one transaction each.

    `fmt` other than canonical: one captured store body per line, through the webhooks' adapters."""
    from subledger.app.canonical import Rejection, to_incoming
    from subledger.app.reader import read_items
    from subledger.app.sources import StripeLinks, build_sources, captured_incoming
    from subledger.outbox.ingest import Incoming, ingest
    from subledger.store.db import connect

    summary = Summary()
    sources = None if fmt == "canonical" else build_sources(services.settings)
    if sources is not None and fmt not in ("apple", "google"):
        app_id = app_id or sources.default_app(fmt)  # type: ignore[arg-type]
        if app_id is None:
            raise ConfigError("--app", f"name the app the {fmt} bodies belong to")
    conn = connect(services.database_url, timeout=services.database_timeout)
    links = StripeLinks(conn, app_id) if fmt == "stripe" and app_id else None
    google_links = None
    if sources is not None and fmt == "google":
        from subledger.app.google_api import GoogleLinks

        google_links = {g.config.app_id: GoogleLinks(conn, g.config.app_id) for g in sources.google.values()}

    def flush(batch: list[Incoming]) -> None:
        if not batch:
            return
        for outcome in ingest(conn, batch, services.policy, services.clock()):
            if outcome.result == "new":
                summary.new += 1
                summary.transitions += len(outcome.transitions)
            else:
                summary.duplicate += 1
        if fmt == "revenuecat":
            _apply_transfers(conn, services, batch)
        batch.clear()

    def reject(line: int, reason: str) -> None:
        summary.rejected += 1
        if len(summary.rejections) < MAX_REJECTIONS_SHOWN:
            summary.rejections.append(f"{name}:{line}: {reason}")

    def checked_items() -> Iterator[tuple[int, Incoming | Rejection | str]]:
        for item in _with_progress(read_items(stream), stream, enabled=progress):
            if item.error:
                yield item.line, item.error
            elif sources is None:
                yield item.line, to_incoming(item.value, item.raw, services.settings, historical=historical)
            else:
                yield item.line, captured_incoming(
                    sources, fmt, item.raw, services.settings,  # type: ignore[arg-type]
                    app_id=app_id, links=links, historical=historical, google_links=google_links,
                )

    # Canonical input is parsed on a second thread: it runs while this one waits for the
    # database. Captured Stripe bodies look things up on `conn`, so they stay on this thread.
    items = in_background(checked_items()) if sources is None else checked_items()
    batch: list[Incoming] = []
    try:
        for line, checked in items:
            if isinstance(checked, str):
                reject(line, checked)
            elif isinstance(checked, Rejection):
                where = f"{checked.field}: " if checked.field else ""
                reject(line, where + checked.reason)
            else:
                batch.append(checked)
                if len(batch) >= BATCH:
                    flush(batch)
        flush(batch)
    finally:
        conn.close()
    return summary


def _apply_transfers(conn: Any, services: Any, batch: list[Any]) -> None:
    """A captured RevenueCat TRANSFER links identities as the webhook does, after its batch committed."""
    from subledger.core.sources import revenuecat as rc_source
    from subledger.outbox.identify import apply_transfer
    from subledger.outbox.ingest import wake_relay

    sent: list[str] = []
    for item in batch:
        if item.notification.kind == "TRANSFER" and (moved := rc_source.transfer_links(item.raw)) is not None:
            app_id = item.notification.app_id
            sent += apply_transfer(conn, app_id, moved, services.policy.destinations_for(app_id), services.clock())
    if sent:
        wake_relay(conn)


def in_background(items: Iterator[T], *, depth: int = 2 * BATCH) -> Iterator[T]:
    """Produce `items` on a daemon thread into a bounded queue (memory stays constant)."""
    import queue
    import threading

    done = object()
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    failure: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put(item)
        except BaseException as exc:  # handed to the consumer below
            failure.append(exc)
        finally:
            box.put(done)

    threading.Thread(target=produce, name="ingest-parse", daemon=True).start()
    try:
        while (item := box.get()) is not done:
            yield item
    finally:
        stop.set()
    if failure:
        raise failure[0]


def _with_progress(items: Iterator[Any], stream: IO[bytes], *, enabled: bool) -> Iterator[Any]:
    """A bar that counts events and events/s; it fills by bytes read when the stream's size is known."""
    if not enabled:
        yield from items
        return
    import os

    from subledger.app.progress import counting

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


class InputFormat(StrEnum):
    canonical = "canonical"
    apple = "apple"
    stripe = "stripe"
    revenuecat = "revenuecat"
    google = "google"


@app.command()
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
            "bodies; the Play state stored in the line under subledger_fetched, else fetched now).",
        ),
    ] = InputFormat.canonical,
    app_id: Annotated[
        str | None,
        typer.Option("--app", help="With --format stripe|revenuecat: the app the bodies belong to "
                     "(default: the only app with that source configured)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    migrate: MigrateOption = None,
) -> None:
    """Ingest canonical events (or captured store bodies with --format); exits 1 when any item was rejected."""
    services = _services(config, database_url)
    _prepare_schema(services, migrate)
    stream = _open(file)
    try:
        summary = ingest_stream(
            services, stream, "<stdin>" if file == "-" else file,
            historical=historical, progress=sys.stderr.isatty() and not as_json,
            fmt=fmt.value, app_id=app_id,
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


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    scheduler: Annotated[
        bool, typer.Option(help="Run the relay and the scheduled jobs in this process too.")
    ] = True,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    migrate: MigrateOption = None,
) -> None:
    """Run the HTTP service (canonical events, webhooks, health, metrics) and the relay + scheduler."""
    from subledger.app.http import create_app
    from subledger.app.startup import summarize
    from subledger.app.worker import build_relay, build_scheduler, configure_logging, serve_http

    if not 0 <= port <= 65535:
        raise fail(f"--port: must be between 0 and 65535, got {port}")
    services = _services(config, database_url)
    _prepare_schema(services, migrate)
    configure_logging()
    summarize(services, listen=f"{host}:{port}", relay=scheduler, explicit_url=database_url).emit()
    jobs = build_scheduler(services, build_relay(services)) if scheduler else None
    if jobs is not None:
        jobs.start()
    try:
        # uvicorn handles SIGTERM/SIGINT here; when it returns, the scheduler finishes its pass and stops.
        serve_http(create_app(services), host=host, port=port)
    finally:
        if jobs is not None:
            jobs.stop()


@app.command()
def relay(
    once: Annotated[bool, typer.Option("--once", help="Drain what is due now, then exit.")] = False,
    batch_rows: Annotated[int, typer.Option(help="Outbox rows claimed per pass.", min=1)] = 1000,
    lease_seconds: Annotated[
        float, typer.Option(help="How long a claim is held without renewal (a live relay renews it); "
                                 "a killed relay's rows return after it.", min=0.1)
    ] = 10.0,
    interval: Annotated[float, typer.Option(help="Relay poll interval in seconds (NOTIFY wakes it sooner).")] = 1.0,
    backoff_base: Annotated[float, typer.Option(help="First retry delay in seconds (then doubled).")] = 1.0,
    backoff_cap: Annotated[float, typer.Option(help="Longest retry delay in seconds.")] = 300.0,
    expirations: Annotated[bool, typer.Option(help="Also run the inferred-expiration job.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: print the counts as JSON.")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    migrate: MigrateOption = None,
) -> None:
    """Run the outbox relay (and the scheduled jobs) without the HTTP service; stops on SIGTERM/SIGINT."""
    from subledger.app.worker import build_relay, build_scheduler, configure_logging, run_until_signal

    services = _services(config, database_url)
    _prepare_schema(services, migrate)
    configure_logging()
    try:
        worker = build_relay(
            services, batch_rows=batch_rows, lease_seconds=lease_seconds,
            backoff_base=backoff_base, backoff_cap=backoff_cap,
        )
    except ValueError as exc:
        raise fail(f"--lease-seconds: {exc}") from None
    if once and not worker.routes:
        err.print("warning: no destinations are configured; nothing will be sent", highlight=False)
    if not once:
        from subledger.app.startup import summarize

        summarize(services, listen=None, relay=True, explicit_url=database_url).emit()
    if once:
        try:
            stats = worker.drain()
        except StoreError as exc:
            raise fail(str(exc)) from None
        finally:
            worker.close()
        counts = {k: getattr(stats, k) for k in ("claimed", "delivered", "dead", "retried", "released", "requests")}
        if as_json:
            print(json.dumps(counts))
        else:
            out.print(", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
        return
    run_until_signal(build_scheduler(services, worker, interval=interval, expirations=expirations))


@app.command()
def sink(
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8089,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    write_key: Annotated[
        list[str] | None, typer.Option(help="Accept only these write keys (repeatable); default: any.")
    ] = None,
    full: Annotated[bool, typer.Option("--json", help="Print each message as JSON instead of a summary.")] = False,
) -> None:
    """A local Segment-compatible endpoint that prints what it receives (set `endpoint` to its URL)."""
    from subledger.outbox.sink import Sink, printer

    server = Sink(host, port, write_keys=set(write_key) if write_key else None, echo=printer(sys.stdout, full=full))
    err.print(f"Segment-compatible sink on {server.url} (POST /v1/batch); Ctrl-C or SIGTERM to stop", highlight=False)
    stopping = threading.Event()
    # A background job ignores SIGINT, so SIGTERM must stop the sink too; both end in the same clean exit.
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    server.start()
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        from subledger.app.wording import plural

        err.print(f"received {plural(server.capture.distinct(), 'distinct message')}", highlight=False)


@app.command()
def demo() -> None:
    """Run the whole pipeline on bundled samples: embedded PostgreSQL, ingest, relay, timelines, messages.

    The `subledger_demo` database is recreated on every run and left in place afterwards, so
    `subledger audit ... --database-url` can explore it."""
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


def _show_version(value: bool) -> None:
    if value:
        from subledger.app.settings import package_version

        print(f"subledger {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_show_version)
    ] = False,
) -> None:
    """subledger: store notifications in, lifecycle events to Segment out, exactly once."""


def _click_exceptions() -> tuple[type[Exception], type[Exception]]:
    """(ClickException, NoArgsIsHelpError) of the click typer runs on (newer typers vendor their own)."""
    try:
        from typer._click import exceptions as click_exceptions  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # typer < 0.25 runs on click itself
        from click import exceptions as click_exceptions  # type: ignore[no-redef,unused-ignore]
    no_args = getattr(click_exceptions, "NoArgsIsHelpError", None) or click_exceptions.UsageError
    return click_exceptions.ClickException, no_args


def main() -> None:
    """The console script: a usage error is one line (`error: ...`), as every other refusal is."""
    from subledger.app.wording import plain

    click_exception, no_args = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except no_args:
        code = 2  # the help was printed
    except click_exception as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see `{ctx.command_path} --help`)"
        message = plain(exc.format_message()) + hint  # type: ignore[attr-defined]
        raise SystemExit(fail(message, getattr(exc, "exit_code", 2)).exit_code) from None
    except (KeyboardInterrupt, EOFError):
        code = 130
    raise SystemExit(code if isinstance(code, int) else 0)
