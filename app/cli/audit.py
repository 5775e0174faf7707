"""`subledger audit ...`: answer "what happened to this subscriber, why was this sent, did it arrive".

Every command prints a readable table, or with `--json` the same data as JSON (the HTTP API under
`/v1/audit` returns the identical documents). `audit events` always writes NDJSON, streamed.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated

import orjson
import typer
from rich.table import Table

from subledger.app.cli.common import (
    ConfigOption,
    DatabaseOption,
    JsonOption,
    connection,
    err,
    fail,
    out,
    parse_when,
    print_json,
    shown_time,
)
from subledger.app.wording import plural
from subledger.core.chain import Arrival
from subledger.core.events import Environment, EventType, Source
from subledger.store import audit

audit_app = typer.Typer(
    help="Audit the log: subscriber timelines, state at a time, why a message exists, exports, stats.",
    no_args_is_help=True,
)


@audit_app.command("timeline")
def timeline(
    subscriber: Annotated[str, typer.Argument(help="App user id, subscription key (app/store/id) or anon:<key>.")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Every log entry, transition (superseded ones marked) and delivery of a subscriber."""
    with connection(config, database_url) as (_, conn):
        found = audit.timeline(conn, subscriber)
    if not found.subscriptions:
        raise fail(f"no subscription found for {subscriber!r}", 1)
    if as_json:
        print_json(found)
        return
    out.print(f"{subscriber}: {', '.join(found.subscriptions)}", highlight=False)
    entries = Table(title="log entries", title_justify="left")
    for col in ("pos", "source", "id", "type", "occurred", "received", "arrival", "dup", "hist"):
        entries.add_column(col)
    for e in found.entries:
        entries.add_row(str(e.position), e.source, e.external_id, e.kind, shown_time(e.occurred_at),
                        shown_time(e.received_at), e.arrival, str(e.duplicates) if e.duplicates else "",
                        "yes" if e.historical else "")
    out.print(entries)
    transitions = Table(title="transitions", title_justify="left")
    transitions.add_column("transition", no_wrap=True)
    for col in ("kind", "occurred", "from", "subscriber", "note"):
        transitions.add_column(col)
    for t in found.transitions:
        note = "SUPERSEDED" if t.superseded else ("historical" if t.historical else "")
        transitions.add_row(t.id, t.kind, shown_time(t.occurred_at), f"#{t.log_position} {t.event_source}:{t.event_id}",
                            t.subscriber, note)
    out.print(transitions)
    deliveries = Table(title="deliveries", title_justify="left")
    deliveries.add_column("messageId", no_wrap=True)
    for col in ("event", "destination", "status", "attempts", "when", "lease", "last response"):
        deliveries.add_column(col)
    for d in found.deliveries:
        last = d.last_response or d.last_error or ""
        if d.last_attempt_status is not None:
            last = f"{d.last_attempt_status} {last}".strip()
        lease = f"{d.lease_owner} until {shown_time(d.lease_until)}" if d.lease_owner else ""
        deliveries.add_row(d.message_id, d.event or "", d.destination, d.status, str(d.attempts),
                           shown_time(d.delivered_at or d.created_at), lease, last[:60])
    out.print(deliveries)
    for line in pruned_notes(found.pruned_before):
        out.print(f"note {line}", highlight=False)


PRUNED_WHAT = {
    "outbox_attempts": "delivery attempts before {} pruned",
    "outbox_delivered": "bodies of messages delivered before {} pruned (their messageIds are kept)",
    "duplicate_receipts": "duplicate receipts before {} pruned (dup counts only what is kept)",
}


def pruned_notes(pruned_before: dict[str, datetime]) -> list[str]:
    """The timeline's retention notes (README "Retention"): older detail is pruned, not lost."""
    return [PRUNED_WHAT.get(name, name + " before {} pruned").format(shown_time(before) + " UTC")
            for name, before in sorted(pruned_before.items())]


@audit_app.command("state")
def state(
    subscription: Annotated[str, typer.Argument(help="Subscription key: app_id/store/subscription_id.")],
    at: Annotated[str | None, typer.Option("--at", help="Fold the facts that happened up to this time.")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """The subscription's state folded from the log up to TIME (default: now)."""
    when = parse_when(at, "--at") if at else datetime.now(UTC)
    with connection(config, database_url) as (_, conn):
        found = audit.state_at(conn, subscription, when)
    if found is None:
        raise fail(f"the log holds no facts for subscription {subscription!r}", 1)
    if as_json:
        print_json(found)
        return
    out.print(f"{subscription} at {shown_time(when)} UTC: {plural(found.events_applied, 'fact')} folded",
              highlight=False)
    if found.state is None:
        out.print("nothing had happened yet")
        return
    table = Table(show_header=False)
    for key, value in found.state.to_json().items():
        if value not in (None, [], ""):
            table.add_row(key, json.dumps(value) if isinstance(value, list) else str(value))
    out.print(table)
    out.print("transitions so far: " + (", ".join(t.kind.value for t in found.transitions) or "none"),
              highlight=False)


@audit_app.command("explain")
def explain(
    transition: Annotated[str, typer.Argument(help="Transition id (tr_...) or a messageId (sl-....t / .i).")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Causing log entry → transition → rendered message(s) → delivery attempts."""
    with connection(config, database_url) as (_, conn):
        found = audit.explain(conn, transition)
    if found is None:
        raise fail(f"no transition or message {transition!r}", 1)
    if as_json:
        print_json(found)
        return
    t, e = found.transition, found.entry
    if e is not None:
        out.print(f"log entry #{e['position']} {e['source']}:{e['external_id']} ({e['kind']}), "
                  f"occurred {shown_time(e['occurred_at'])}, received {shown_time(e['received_at'])}, "
                  f"{e['duplicates']} duplicate deliveries, hash {bytes(e['hash']).hex()[:16]}…", highlight=False)
    if found.fact is not None:
        out.print("  fact: " + json.dumps(found.fact, ensure_ascii=False, sort_keys=True), highlight=False,
                  markup=False)
    state = "SUPERSEDED at " + shown_time(t["superseded_at"]) if found.superseded else "live"
    out.print(f"transition {t['id']} {t['kind']} for {t['subscriber']} ({state}"
              f"{', historical' if t['historical'] else ''})", highlight=False)
    for m in found.messages:
        if m["body"] is None:  # a tombstone: pruned after its retention, kept so it is never sent again
            out.print(f"message {m['message_id']} → {m['destination']}: delivered "
                      f"{shown_time(m['delivered_at'])}, body pruned ({plural(m['attempts'], 'attempt')})",
                      highlight=False)
            continue
        track = m["body"][0]
        out.print(f"message {m['message_id']} → {m['destination']}: {track.get('event')} "
                  f"({m['status']}, {plural(m['attempts'], 'attempt')})", highlight=False)
        out.print(json.dumps(m["body"], ensure_ascii=False, indent=2, sort_keys=True), highlight=False, markup=False)
    if not found.messages:
        out.print("no message: no destination accepts it (historical, sandbox, event name off) or it was withdrawn")
    for a in found.attempts:
        out.print(f"attempt {shown_time(a['attempted_at'])} {a['message_id']} {a['outcome']} "
                  f"{a['status_code'] or ''} {(a['response'] or '')[:80]}", highlight=False)


@audit_app.command("events")
def events(
    app_id: Annotated[str | None, typer.Option("--app", help="Only this app_id.")] = None,
    source: Annotated[Source | None, typer.Option("--source", help="Only entries from this source.")] = None,
    type_: Annotated[
        EventType | None, typer.Option("--type", help="Only entries whose facts include this canonical event type.")
    ] = None,
    environment: Annotated[Environment | None, typer.Option("--environment", help="Only this environment.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="occurred_at ≥ this time.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="occurred_at < this time.")] = None,
    subscriber: Annotated[str | None, typer.Option("--subscriber", help="App user id or subscription key.")] = None,
    arrival: Annotated[Arrival | None, typer.Option("--arrival", help="Only entries that arrived this way "
                                                                      "(reconciliation: what push lost).")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Export matching log entries as NDJSON on stdout, in log order, in constant memory."""
    flt = audit.EventFilter(
        app_id=app_id, source=source and source.value, type=type_ and type_.value,
        environment=environment and environment.value,
        since=parse_when(since, "--since") if since else None,
        until=parse_when(until, "--until") if until else None,
        subscriber=subscriber, arrival=arrival and arrival.value,
    )
    stdout = sys.stdout.buffer
    count = 0
    try:
        with connection(config, database_url) as (_, conn):
            for row in audit.events(conn, flt):
                stdout.write(orjson.dumps(audit.jsonable(row)) + b"\n")
                count += 1
        stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if sys.stderr.isatty():
        err.print(plural(count, "entry"), highlight=False)


@audit_app.command("stats")
def stats(
    since: Annotated[str | None, typer.Option(
        "--since", help="Range start (default: 24 h before --until). Dates on both ends (2026-11-01) are whole UTC "
                        "days, read from the rollups at a fixed cost.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Range end (default: now).")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Counts over a range (log by source/app/environment, transitions by kind), outbox health, latency."""
    now = datetime.now(UTC)
    end = parse_when(until, "--until") if until else now
    start = parse_when(since, "--since") if since else end - timedelta(days=1)
    with connection(config, database_url) as (_, conn):
        found = audit.stats(conn, start, end, now)
    if as_json:
        print_json(found)
        return
    how = "whole UTC days: counts from the rollups" if found.from_rollups else "counted on the tables' time indexes"
    out.print(f"{shown_time(start)} → {shown_time(end)} UTC ({how})", highlight=False)
    log = Table(title="log entries received", title_justify="left")
    for col in ("source", "app", "environment", "entries"):
        log.add_column(col)
    for r in found.log:
        log.add_row(r["source"], r["app_id"], r["environment"], str(r["entries"]))
    out.print(log)
    transitions = Table(title="transitions derived", title_justify="left")
    for col in ("kind", "app", "source", "environment", "live", "superseded"):
        transitions.add_column(col)
    for r in found.transitions:
        transitions.add_row(r["kind"], r["app_id"], r["source"] or "", r["environment"] or "", str(r["live"]),
                            str(r["superseded"]))
    out.print(transitions)
    oldest = "-" if found.oldest_pending_seconds is None else f"{found.oldest_pending_seconds:,.0f} s"
    lat = found.latency_seconds
    pct = ", ".join(f"{k} {v:.3f} s" for k, v in lat.items() if v is not None) or "-"
    out.print(f"outbox: {found.pending} pending (oldest {oldest}), {found.dead} dead; "
              f"{found.delivered} delivered in range, latency {pct}"
              f"{f' (newest {found.latency_sample:,})' if found.latency_sample else ''}", highlight=False)
    for p in found.paused:
        out.print(f"paused {p['app_id']}/{p['destination']} since {shown_time(p['paused_at'])}: "
                  f"{p['paused_reason'] or 'manual'}", highlight=False)
