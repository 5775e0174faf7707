"""`subledger demo`: the whole pipeline on bundled samples, on a machine with nothing set up."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from subledger.app import settings as settings_module
from subledger.app.bootstrap import Services, build
from subledger.app.samples_loader import ingest_samples, sample_apps
from subledger.app.wording import plural
from subledger.app.worker import build_relay
from subledger.outbox.sink import Sink
from subledger.store import audit, migrate
from subledger.store import outbox as outbox_store
from subledger.store.db import connect, display_url, recreate_database, resolve_url

DEMO_DATABASE = "subledger_demo"
DEMO_WRITE_KEY = "demo-write-key"


def demo_settings(endpoint: str = "http://127.0.0.1:9", api_token: str | None = None) -> settings_module.Settings:
    destinations = {
        "segment": {
            "write_key": DEMO_WRITE_KEY,
            "endpoint": endpoint,
            # The bundled samples are months old; the demo opts in to publishing history.
            "publish_historical": True,
        }
    }
    # The samples' apps (canonical + Apple: com.example.fitness; Stripe: com.example.fitness.web).
    extra = {"api_token": api_token} if api_token else {}
    return settings_module.from_dict({"apps": sample_apps(destinations), **extra})


def run_demo(console: Console, serve: str | None = None) -> None:
    """Sink up, database fresh, samples in, relay until the outbox is drained, then show both ends.

    `serve` ("host:port"): then keep serving the HTTP service and its console on the demo data,
    with the relay, until Ctrl-C or SIGTERM (the sink stays up too, so retries still land)."""
    token = secrets.token_urlsafe(16) if serve else None
    with Sink(write_keys={DEMO_WRITE_KEY}) as sink:
        console.print(f"[bold]sink[/bold] Segment-compatible capture endpoint on {sink.url}")
        server = resolve_url()
        url = recreate_database(server, DEMO_DATABASE)
        console.print(f"[bold]database[/bold] fresh database {DEMO_DATABASE!r} on {_where(server)}")
        migrate.upgrade(url)
        services = build(demo_settings(sink.url, token), database_url=url)
        ingest_samples(services, console)
        relay = build_relay(services, backoff_base=0.2, backoff_cap=2.0)
        try:
            stats = relay.drain_all(timeout=20.0)
        finally:
            relay.close()
        console.print(
            f"[bold]relay[/bold] delivered {plural(stats.delivered, 'outbox row')} in "
            f"{plural(stats.requests, '/v1/batch request')}, dead-lettered {stats.dead}"
        )
        with connect(url) as conn:
            print_timelines(console, conn)
            found = outbox_store.readiness(conn)
        left = [(n, status) for status, n in (("dead", found.dead), ("pending", found.pending)) if n]
        print_received(console, sink.capture.messages())
        console.print(
            f"[bold]segment[/bold] the sink received {plural(sink.capture.distinct(), 'distinct messageId')} "
            f"({plural(len(sink.capture.duplicates()), 'duplicate')}); outbox left: "
            + (", ".join(f"{n} {status}" for n, status in left) or "empty")
        )
        print_next_steps(console, url)
        if serve is None:
            console.print("see it in the web console: `subledger demo --serve`, then open the URL it prints",
                          highlight=False, markup=False)
            return
        serve_console(console, services, serve, token or "")


def serve_console(console: Console, services: Services, listen: str, token: str) -> None:
    """The HTTP service (console included) and the relay on the demo database, until a signal."""
    from subledger.app.http import create_app  # deferred: FastAPI loads only when the demo serves
    from subledger.app.worker import build_scheduler, serve_http

    host, _, port = listen.rpartition(":")
    console.print(f"[bold]console[/bold] http://{host}:{port}/console  (sign in with the API token {token}; "
                  "Ctrl-C or SIGTERM stops)", soft_wrap=True, highlight=False)
    jobs = build_scheduler(services, build_relay(services, backoff_base=0.2, backoff_cap=2.0), expirations=False)
    jobs.start()
    try:
        serve_http(create_app(services), host=host, port=int(port))
    finally:
        jobs.stop()


def print_next_steps(console: Console, url: str) -> None:
    """The demo database stays: say where it is and what to try on it next."""
    shown = display_url(url)
    masked = " (password masked)" if ":***@" in shown else ""
    console.print(f"[bold]demo database[/bold] {shown}{masked}", soft_wrap=True, highlight=False)
    console.print("try next:", highlight=False)
    program = command_name()
    for command in ("audit timeline user_ada", "audit stats"):
        console.print(f"  {program} {command} --database-url '{shown}'", soft_wrap=True, highlight=False,
                      markup=False)
    if not os.environ.get("SUBLEDGER_DATABASE_URL"):
        console.print(f"the embedded PostgreSQL keeps running for later commands: `{program} db status` shows it, "
                      f"`{program} db stop` stops it", soft_wrap=True, highlight=False, markup=False)


def command_name() -> str:
    """`subledger` when the shell finds it; else the script's own path (`make demo` runs .venv/bin/subledger,
    which is not on PATH until the venv is activated), so the suggested commands work when pasted."""
    import shutil
    import sys

    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if shutil.which("subledger") or script is None or script.name != "subledger" or not script.exists():
        return "subledger"
    try:
        return str(script.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(script.resolve())


def print_received(console: Console, messages: list[dict[str, Any]]) -> None:
    """Exactly what the endpoint accepted, in arrival order: one line per message, never cropped."""
    console.print(f"[bold]received by the Segment-compatible endpoint[/bold] ({plural(len(messages), 'message')}, "
                  "arrival order; full JSON with `subledger sink --json`)")
    for m in messages:
        who = m.get("userId") or m.get("anonymousId", "")
        if m.get("type") == "track":
            props = m.get("properties") or {}
            what = str(m.get("event"))
            if "revenue" in props:
                what += f" revenue={props['revenue']} {props.get('currency', '')}"
        else:
            what = " ".join(f"{k}={v}" for k, v in sorted((m.get("traits") or {}).items()))
        console.print(
            f"  {m.get('type'):<8} {m.get('timestamp')} {who:<12} {what}  [dim]{m.get('messageId')}[/dim]",
            soft_wrap=True, highlight=False,
        )


def _where(url: str) -> str:
    return "the embedded PostgreSQL" if "host=/" in url or "@/" in url else url.split("@")[-1]


def print_timelines(console: Console, conn: psycopg.Connection) -> None:
    """Each subscriber's log entries and transitions in time order, with the messages each sent:
    the audit timeline (`subledger audit timeline`) of every subscriber, as one table each."""
    for subscriber in audit.subscribers(conn):
        found = audit.timeline(conn, subscriber)
        table = Table(title=f"subscriber {subscriber}", title_justify="left", show_lines=False)
        for column in ("occurred_at", "what", "detail"):
            table.add_column(column)
        rows: list[tuple[Any, str, str]] = []
        for entry in sorted(found.entries, key=lambda e: e.position):
            # A stored-only entry (no facts, e.g. Stripe's $0 trial invoice) has no occurrence time:
            # show it where it arrived, next to the entry logged before it.
            stored_only = entry.occurred_at is None
            occurred = entry.occurred_at or (rows[-1][0] if rows else None)
            if occurred is None:
                continue
            what = f"log  {entry.kind}" + (" (stored only)" if stored_only else "")
            rows.append((occurred, what, f"{entry.source}:{entry.external_id}"))
        sent: dict[str, list[str]] = {}
        for d in sorted(found.deliveries, key=lambda d: d.status == "delivered"):  # waiting ones first
            sent.setdefault(d.transition_id, []).append(
                f"{d.event} {d.message_id}" + (" (delivered)" if d.status == "delivered" else ""))
        for t in found.transitions:
            if t.subscriber != subscriber:
                continue
            mark = " (superseded)" if t.superseded else ""
            rows.append((t.occurred_at, f"[green]→ {t.kind}{mark}[/green]", ", ".join(sent.get(t.id, []))
                         or "not published"))
        for occurred, what, detail in sorted(rows, key=lambda r: r[0]):
            table.add_row(occurred.strftime("%Y-%m-%d %H:%M"), what, detail)
        console.print(table)
