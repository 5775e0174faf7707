"""The long-running commands and the showcase: `serve`, `relay`, `sink` and `demo`.

Each builds its services at run time; nothing starts at import. The HTTP service, the relay and the
demo load their libraries only when run, so `subledger --help` and the short commands start fast.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Annotated

import typer

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
from subledger.app.startup import summarize
from subledger.app.wording import plural
from subledger.core.errors import StoreError
from subledger.outbox.sink import Sink, printer


def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    scheduler: Annotated[
        bool, typer.Option(help="Run the relay and the scheduled jobs in this process too.")
    ] = True,
    workers: Annotated[int, typer.Option(
        help="HTTP worker processes. 1: one process serves and relays. N > 1: N processes answer HTTP "
             "(for bursts: use the cores) and the relay + jobs run in the parent, out of their way.",
        min=1, max=64)] = 1,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    migrate: MigrateOption = None,
) -> None:
    """Run the HTTP service (canonical events, webhooks, health, metrics) and the relay + scheduler."""
    # deferred: FastAPI, the store adapters and APScheduler load (seconds) only for a serving process
    from subledger.app.http import create_app
    from subledger.app.worker import build_relay, build_scheduler, configure_logging, serve_http

    if not 0 <= port <= 65535:
        raise fail(f"--port: must be between 0 and 65535, got {port}")
    services = services_for(config, database_url)
    configure_logging()
    prepare_schema(services, migrate, announce=logging.getLogger("subledger.startup").info)
    summarize(services, listen=f"{host}:{port}", relay=scheduler, explicit_url=database_url).emit()
    jobs = build_scheduler(services, build_relay(services)) if scheduler else None
    if jobs is not None:
        jobs.start()
    try:
        # uvicorn handles SIGTERM/SIGINT here; when it returns, the scheduler finishes its pass and stops.
        if workers > 1:
            from subledger.app.http_workers import serve_workers

            logging.getLogger("subledger").info(
                "%d HTTP worker processes; %s", workers,
                "the relay and the jobs run in this process" if scheduler else "no relay in this process")
            serve_workers(host=host, port=port, workers=workers, config=config, database_url=services.database_url)
        else:
            serve_http(create_app(services), host=host, port=port)
    finally:
        if jobs is not None:
            jobs.stop()


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
    # deferred: the relay's HTTP client and APScheduler load only for a relaying process
    from subledger.app.worker import build_relay, build_scheduler, configure_logging, run_until_signal

    services = services_for(config, database_url)
    configure_logging()
    prepare_schema(services, migrate, announce=logging.getLogger("subledger.startup").info)
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


def sink(
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8089,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    write_key: Annotated[
        list[str] | None, typer.Option(help="Accept only these write keys (repeatable); default: any.")
    ] = None,
    full: Annotated[bool, typer.Option("--json", help="Print each message as JSON instead of a summary.")] = False,
) -> None:
    """A local Segment-compatible endpoint that prints what it receives (set `endpoint` to its URL)."""
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
        err.print(f"received {plural(server.capture.distinct(), 'distinct message')}", highlight=False)


def demo(
    serve: Annotated[bool, typer.Option("--serve", help="Then serve the web console on the demo data until "
                                                        "Ctrl-C/SIGTERM.")] = False,
    port: Annotated[int, typer.Option(help="With --serve: port to bind.")] = 8080,
    host: Annotated[str, typer.Option(help="With --serve: address to bind.")] = "127.0.0.1",
) -> None:
    """Run the whole pipeline on bundled samples: embedded PostgreSQL, ingest, relay, timelines, messages.

    The `subledger_demo` database is recreated on every run and left in place afterwards, so
    `subledger audit ... --database-url` can explore it."""
    # deferred: the demo loads every store adapter and the relay, only when it runs
    from subledger.app.demo import run_demo

    if not 0 <= port <= 65535:
        raise fail(f"--port: must be between 0 and 65535, got {port}")
    try:
        run_demo(out, f"{host}:{port}" if serve else None)
    except StoreError as exc:
        raise fail(str(exc)) from None
