"""A stream of events into the ledger: canonical NDJSON/JSON, or captured store bodies, in batches of 1,000.

The use case behind `subledger ingest` and the demo's samples (which is why it is not in the CLI:
the demo calls it as the CLI does). Each line is validated as `POST /v1/events` (canonical) or a
webhook (captured bodies) validates it; a refused line is counted and named, the others are
ingested one transaction per batch, so memory stays constant whatever the file's size. Every entry
is logged with arrival `import`.

Canonical NDJSON goes to the parallel import (app/bulk_import.py: derivation in `jobs` worker
processes); a JSON array and captured store bodies (whose adapters may look things up on the
connection) are ingested here, in this process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import IO, Any, TypeVar

import psycopg

from subledger.app import bulk_import
from subledger.app.bootstrap import Services
from subledger.app.canonical import Rejection, to_incoming
from subledger.app.ingest_summary import IMPORT, MAX_REJECTIONS_SHOWN, Summary, rejection_text
from subledger.app.reader import read_items
from subledger.core.errors import ConfigError
from subledger.core.sources import revenuecat as rc_source
from subledger.outbox.identify import apply_transfer
from subledger.outbox.ingest import Incoming, ingest, wake_relay
from subledger.store.db import connect

BATCH = 1000
T = TypeVar("T")
# Wraps the items read from the stream (to show progress, say) and yields them unchanged.
Watch = Callable[[Iterator[Any], IO[bytes]], Iterator[Any]]
__all__ = ["BATCH", "MAX_REJECTIONS_SHOWN", "Summary", "Watch", "in_background", "ingest_stream"]


def ingest_stream(
    services: Services, stream: IO[bytes], name: str, *, historical: bool = False, progress: Watch | None = None,
    fmt: str = "canonical", app_id: str | None = None, jobs: int = 1,
) -> Summary:
    """Stream, validate and ingest in batches of 1,000, one transaction each.

    `fmt` other than canonical: one captured store body per line, through the webhooks' adapters.
    `progress` sees every item read (the CLI draws a bar with it on a terminal). `jobs`: worker
    processes for canonical NDJSON (1: all in this process, the default for callers that may run
    threads of their own, like the demo; the CLI asks for the CPU count)."""
    if fmt == "canonical" and bulk_import.is_ndjson(stream):
        return bulk_import.import_ndjson(services, stream, name, historical=historical, progress=progress, jobs=jobs)
    # deferred: the store adapters load Apple's library and google-auth (seconds), only for captured bodies
    from subledger.app.amazon_api import ReceiptLinks
    from subledger.app.google_api import GoogleLinks
    from subledger.app.sources import StripeLinks, build_sources, captured_incoming

    summary = Summary()
    sources = None if fmt == "canonical" else build_sources(services.settings)
    if sources is not None and fmt not in ("apple", "google", "amazon"):  # those route by the body's app
        app_id = app_id or sources.default_app(fmt)  # type: ignore[arg-type]
        if app_id is None:
            raise ConfigError("--app", f"name the app the {fmt} bodies belong to")
    conn = connect(services.database_url, timeout=services.database_timeout)
    links = StripeLinks(conn, app_id) if fmt == "stripe" and app_id else None
    google_links = None
    if sources is not None and fmt == "google":
        google_links = {g.config.app_id: GoogleLinks(conn, g.config.app_id) for g in sources.google.values()}
    amazon_links = None
    if sources is not None and fmt == "amazon":
        amazon_links = {a.config.app_id: ReceiptLinks(conn, a.config.app_id) for a in sources.amazon.values()}

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
        summary.reject(name, line, reason)

    def checked_items() -> Iterator[tuple[int, Incoming | Rejection | str]]:
        read = read_items(stream)
        for item in read if progress is None else progress(read, stream):
            if item.error:
                yield item.line, item.error
            elif sources is None:
                yield item.line, to_incoming(item.value, item.raw, services.settings, historical=historical)
            else:
                yield item.line, captured_incoming(
                    sources, fmt, item.raw, services.settings,  # type: ignore[arg-type]
                    app_id=app_id, links=links, historical=historical, google_links=google_links,
                    amazon_links=amazon_links,
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
                reject(line, rejection_text(checked))
            else:
                batch.append(replace(checked, arrival=IMPORT))
                if len(batch) >= BATCH:
                    flush(batch)
        flush(batch)
    finally:
        conn.close()
    return summary


def _apply_transfers(conn: psycopg.Connection, services: Services, batch: list[Incoming]) -> None:
    """A captured RevenueCat TRANSFER links identities as the webhook does, after its batch committed."""
    sent: list[str] = []
    for item in batch:
        if item.notification.kind == "TRANSFER" and (moved := rc_source.transfer_links(item.raw)) is not None:
            app_id = item.notification.app_id
            sent += apply_transfer(conn, app_id, moved, services.policy.destinations_for(app_id), services.clock())
    if sent:
        wake_relay(conn)


def in_background(items: Iterator[T], *, depth: int = 2 * BATCH) -> Iterator[T]:
    """Produce `items` on a daemon thread into a bounded queue (memory stays constant)."""
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
