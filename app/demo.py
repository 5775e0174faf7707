"""`subledger demo`: the whole pipeline on bundled samples, on a machine with nothing set up."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.samples_loader import ingest_samples, sample_apps
from subledger.app.wording import plural
from subledger.core.lifecycle import subscriber_id
from subledger.store import migrate
from subledger.store.db import recreate_database, resolve_url

DEMO_DATABASE = "subledger_demo"
DEMO_WRITE_KEY = "demo-write-key"


def demo_settings(endpoint: str = "http://127.0.0.1:9") -> settings_module.Settings:
    destinations = {
        "segment": {
            "write_key": DEMO_WRITE_KEY,
            "endpoint": endpoint,
            # The bundled samples are months old; the demo opts in to publishing history.
            "publish_historical": True,
        }
    }
    # The samples' apps (canonical + Apple: com.example.fitness; Stripe: com.example.fitness.web).
    return settings_module.from_dict({"apps": sample_apps(destinations)})


def run_demo(console: Console) -> None:
    """Sink up, database fresh, samples in, relay until the outbox is drained, then show both ends."""
    from subledger.app.worker import build_relay
    from subledger.outbox.sink import Sink

    with Sink(write_keys={DEMO_WRITE_KEY}) as sink:
        console.print(f"[bold]sink[/bold] Segment-compatible capture endpoint on {sink.url}")
        server = resolve_url()
        url = recreate_database(server, DEMO_DATABASE)
        console.print(f"[bold]database[/bold] fresh database {DEMO_DATABASE!r} on {_where(server)}")
        migrate.upgrade(url)
        services = build(demo_settings(sink.url), database_url=url)
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
        with psycopg.connect(url) as conn:
            print_timelines(console, conn)
            left = conn.execute("SELECT status, count(*) FROM outbox GROUP BY 1 ORDER BY 1").fetchall()
        print_received(console, sink.capture.messages())
        console.print(
            f"[bold]segment[/bold] the sink received {plural(sink.capture.distinct(), 'distinct messageId')} "
            f"({plural(len(sink.capture.duplicates()), 'duplicate')}); outbox left: "
            + (", ".join(f"{n} {status}" for status, n in left) or "empty")
        )
        print_next_steps(console, url)


def print_next_steps(console: Console, url: str) -> None:
    """The demo database stays: say where it is and what to try on it next."""
    from subledger.store.db import display_url

    shown = display_url(url)
    masked = " (password masked)" if ":***@" in shown else ""
    console.print(f"[bold]demo database[/bold] {shown}{masked}", soft_wrap=True, highlight=False)
    console.print("try next:", highlight=False)
    for command in ("audit timeline user_ada", "audit stats"):
        console.print(f"  subledger {command} --database-url '{shown}'", soft_wrap=True, highlight=False,
                      markup=False)
    if not os.environ.get("SUBLEDGER_DATABASE_URL"):
        console.print("the embedded PostgreSQL keeps running for later commands: `subledger db status` shows it, "
                      "`subledger db stop` stops it", soft_wrap=True, highlight=False, markup=False)


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
    keys_of: dict[str, list[str]] = {}
    for app_user_id, key in conn.execute("SELECT app_user_id, key FROM subscriptions ORDER BY key"):
        keys_of.setdefault(subscriber_id(app_user_id, key), []).append(key)
    for subscriber in sorted(keys_of):
        table = Table(title=f"subscriber {subscriber}", title_justify="left", show_lines=False)
        for column in ("occurred_at", "what", "detail"):
            table.add_column(column)
        rows: list[tuple[Any, str, str]] = []
        for occurred, kind, source, external_id in conn.execute(
            """
            SELECT occurred_at, kind, source, external_id FROM event_log
            WHERE subscription_key = ANY(%s) ORDER BY position
            """,
            (keys_of[subscriber],),
        ):
            # A stored-only entry (no facts, e.g. Stripe's $0 trial invoice) has no occurrence time:
            # show it where it arrived, next to the entry logged before it.
            stored_only = occurred is None
            occurred = occurred or (rows[-1][0] if rows else None)
            if occurred is None:
                continue
            what = f"log  {kind}" + (" (stored only)" if stored_only else "")
            rows.append((occurred, what, f"{source}:{external_id}"))
        for occurred, kind, superseded, messages in conn.execute(
            """
            SELECT t.occurred_at, t.kind, t.superseded_at IS NOT NULL,
                   coalesce((SELECT string_agg(o.body->0->>'event' || ' ' || o.message_id, ', ')
                             FROM outbox o WHERE o.transition_id = t.id), '')
                   || coalesce((SELECT string_agg(d.body->0->>'event' || ' ' || d.message_id || ' (delivered)', ', ')
                             FROM outbox_delivered d WHERE d.transition_id = t.id), '')
            FROM transitions t WHERE t.subscriber = %s ORDER BY t.occurred_at
            """,
            (subscriber,),
        ):
            mark = " (superseded)" if superseded else ""
            rows.append((occurred, f"[green]→ {kind}{mark}[/green]", messages or "not published"))
        for occurred, what, detail in sorted(rows, key=lambda r: r[0]):
            table.add_row(occurred.strftime("%Y-%m-%d %H:%M"), what, detail)
        console.print(table)
