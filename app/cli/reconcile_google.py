"""`subledger reconcile google`: voided purchases and the subscriptionsv2 sweep, for apps with a Play source.

A command of the `reconcile` group (app/cli/reconcile.py), registered by importing this module
(app/cli/__init__.py). One line per app (or `--json`); exit 1 when Google could not be read, so a
cron job's failure is visible. A progress bar on a terminal (stderr, transient) while the voided
pages are read and the sweep fetches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import TaskID

from subledger.app.cli.common import ConfigOption, DatabaseOption, JsonOption, connection, err, fail, out, parse_when
from subledger.app.cli.reconcile import chosen_apps, print_json, reconcile_app, sources_or_fail
from subledger.app.google_api import PlayApi
from subledger.app.progress import counting
from subledger.app.reconcile_google import GoogleSummary, Progress, reconcile_google
from subledger.app.reconcile_schedule import RECONCILERS
from subledger.app.wording import plural
from subledger.core.errors import PayloadRejected, StoreError, Transient
from subledger.outbox.ingest import wake_relay


@contextmanager
def _bar(show: bool, app_id: str) -> Iterator[Progress | None]:
    if not show:
        yield None
        return
    with counting(err, f"google {app_id}", "items") as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield progress


@reconcile_app.command("google")
def google(
    app: Annotated[str | None, typer.Option("--app", help="Only this app (default: every app with a Google Play "
                                                          "source).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Read voided purchases from this time (RFC 3339; "
                                                              "default: the cursor less a day, at most 30 days).")]
    = None,
    all_types: Annotated[bool, typer.Option("--all", help="The whole 30-day voided window, not only since the "
                                                          "cursor (the daily run).")] = False,
    sweep_limit: Annotated[int | None, typer.Option("--sweep-limit", min=0, help="At most this many live-but-ended "
                                                    "subscriptions fetched (default: the app's sweep_limit; 0: no "
                                                    "sweep).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be recovered; write nothing.")]
    = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """List Play's voided purchases and sweep live subscriptions whose period ended; ingest what the log lacks."""
    start = parse_when(since, "--since") if since is not None else None
    with connection(config, database_url) as (services, conn):
        settings = services.settings
        sources = sources_or_fail(settings)
        chosen = chosen_apps(settings, RECONCILERS["google"], app)
        summaries: list[GoogleSummary] = []
        show = sys.stderr.isatty() and not as_json
        for app_id in chosen:
            google_settings = settings.apps[app_id].google
            assert google_settings is not None
            api = PlayApi(app_id, google_settings)
            try:
                with _bar(show, app_id) as progress:
                    summaries.append(reconcile_google(conn, sources, api, app_id, services.policy, services.clock(),
                                                      since=start, all_types=all_types, dry_run=dry_run,
                                                      sweep_limit=sweep_limit, progress=progress))
            except (Transient, PayloadRejected) as exc:
                if isinstance(exc, StoreError):
                    raise
                raise fail(f"reconcile google {app_id}: {exc}", 1) from None
            finally:
                api.close()
        if any(s.recovered for s in summaries) and not dry_run:
            wake_relay(conn)
    if as_json:
        print_json(summaries)
        return
    for s in summaries:
        verb = "would recover" if dry_run else "recovered"
        out.print(f"google {s.app_id}: {verb} {plural(s.recovered, 'fact')}, {s.duplicates} already logged, "
                  f"{s.refused} refused; {plural(s.listed, 'voided purchase')} listed, "
                  f"{plural(s.swept, 'subscription')} swept ({s.unchanged} unchanged, {s.gone} gone); "
                  f"{plural(s.api_calls, 'API call')}", highlight=False, markup=False)
