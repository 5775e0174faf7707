"""`subledger outbox ...`: see what waits, retry what died, pause or resume a destination."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from subledger.app.cli.common import (
    ConfigOption,
    DatabaseOption,
    JsonOption,
    connection,
    fail,
    out,
    print_json,
    shown_time,
)
from subledger.app.wording import plural
from subledger.core.errors import NotFound, UnknownTarget
from subledger.outbox import ops
from subledger.outbox.ingest import wake_relay

outbox_app = typer.Typer(help="Outbox operations: list, retry, pause, resume.", no_args_is_help=True)


class RowStatus(StrEnum):
    PENDING = "pending"
    DEAD = "dead"


@outbox_app.command("list")
def list_rows(
    status: Annotated[RowStatus | None, typer.Option("--status", help="Only pending or only dead rows.")] = None,
    app_id: Annotated[str | None, typer.Option("--app", help="Only this app_id.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many rows.")] = 100,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Rows waiting in the outbox (delivered ones have left it; see `audit timeline`)."""
    with connection(config, database_url) as (_, conn):
        rows = ops.list_rows(conn, status=None if status is None else status.value, app_id=app_id, limit=limit)
    if as_json:
        print_json(rows)
        return
    table = Table()
    for col in ("id", "messageId", "event", "app/destination", "subscriber", "status", "attempts", "due",
                "lease holder", "lease until", "last error"):
        table.add_column(col)
    for r in rows:  # a lease shows which relay holds the row now (host:pid:random) and until when
        table.add_row(str(r["id"]), r["message_id"], r["event"] or "", f"{r['app_id']}/{r['destination']}",
                      r["subscriber"], r["status"], str(r["attempts"]), shown_time(r["available_at"]),
                      r["lease_owner"] or "", shown_time(r["lease_until"]), (r["last_error"] or "")[:60])
    out.print(table)
    out.print(plural(len(rows), "row"), highlight=False)


@outbox_app.command("retry")
def retry(
    ref: Annotated[str | None, typer.Argument(help="Outbox row id or messageId.")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Retry every dead row.")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Make a row (or every dead row) due now, keeping its messageId; never-sent rows are re-rendered."""
    if (ref is None) == (not dead):
        raise fail("name one row (ID or messageId) or pass --dead, not both")
    with connection(config, database_url) as (services, conn):
        try:
            with conn.transaction():
                result = ops.retry(conn, services.policy, services.clock(), ref=ref, dead=dead)
        except NotFound as exc:
            raise fail(str(exc), 1) from None
        if result.requeued:
            wake_relay(conn)
    if as_json:
        print(json.dumps(result.as_json()))
        return
    out.print(f"requeued {plural(len(result.requeued), 'row')} ({len(result.rerendered)} re-rendered with the current "
              f"configuration)", highlight=False)
    for message_id, reason in result.still_dead:
        out.print(f"still dead {message_id}: {reason}", highlight=False, markup=False)


@outbox_app.command("pause")
def pause(
    app_id: Annotated[str, typer.Argument(help="The app whose destination(s) to pause.")],
    destination: Annotated[str | None, typer.Option("--destination", help="Only this destination.")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Shown in stats and /readyz.")] = "paused by operator",
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Stop sending to an app's destination(s); rows stay pending until `outbox resume`."""
    with connection(config, database_url) as (services, conn), conn.transaction():
        try:
            names = ops.targets(conn, services.policy, app_id, destination)
        except UnknownTarget as exc:
            raise fail(str(exc)) from None
        ops.pause(conn, app_id, names, services.clock(), reason)
    out.print(f"paused {', '.join(f'{app_id}/{n}' for n in names)}", highlight=False)


@outbox_app.command("resume")
def resume(
    app_id: Annotated[str, typer.Argument(help="The app whose destination(s) to resume.")],
    destination: Annotated[str | None, typer.Option("--destination", help="Only this destination.")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Resume sending (also lifts a rate-limit wait)."""
    with connection(config, database_url) as (services, conn):
        with conn.transaction():
            try:
                ops.targets(conn, services.policy, app_id, destination, resuming=True)
            except UnknownTarget as exc:
                raise fail(str(exc)) from None
            resumed = ops.resume(conn, app_id, destination)
        if resumed:
            wake_relay(conn)
    if not resumed:
        out.print(f"nothing was paused for {app_id}" + (f"/{destination}" if destination else ""), highlight=False)
        return
    out.print(f"resumed {', '.join(f'{a}/{d}' for a, d in resumed)}", highlight=False)
