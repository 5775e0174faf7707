"""`subledger prune`: one run of the retention job now, as `serve` and `relay` run it every hour.

For an operator who wants to see what `[retention]` would remove (`--dry-run`), or to catch up
after raising the retention's aggressiveness without waiting for the next scheduled run.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from subledger.app.cli.common import ConfigOption, DatabaseOption, JsonOption, connection, err, out
from subledger.app.wording import plural
from subledger.store import retention


def prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be pruned; change nothing.")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Prune delivery detail older than the configured retention, in small batches (never the event log)."""
    with connection(config, database_url) as (services, conn):
        settings = services.settings
        configured = {(app_id, name) for app_id, app in settings.apps.items() for name in app.destinations}
        result = retention.prune(conn, settings.retention.policy(), services.clock(), configured=configured,
                                 dry_run=dry_run)
    if as_json:
        print(json.dumps({
            "dry_run": result.dry_run, "complete": result.complete, "batches": result.batches,
            "outbox_attempts": result.attempts, "outbox_delivered_bodies": result.delivered,
            "duplicate_receipts": result.duplicate_receipts, "destination_state": result.destination_state,
        }))
    else:
        verb = "would prune" if dry_run else "pruned"
        out.print(
            f"{verb} {plural(result.attempts, 'attempt')}, {plural(result.delivered, 'delivered body')}"
            f" (their messageIds are kept), {plural(result.duplicate_receipts, 'duplicate receipt')}, "
            f"{plural(result.destination_state, 'destination state')}",
            highlight=False,
        )
    if not result.complete:
        err.print(f"error: stopped before the end: {result.incomplete}; run it again", highlight=False)
        raise typer.Exit(1)
