"""`subledger reconcile <store>` and `subledger reconcile status`: the facts a store's webhooks never delivered.

One command per store in the registry (app/reconcile_schedule.py `RECONCILERS`), all made by
`_store_command`, so each spells its options the same way and runs exactly what the scheduled jobs
run. One line per app (or `--json`, one summary per app) and, on a terminal, a progress bar of
pages read; exit 1 when the API could not be read, so a cron job's failure is visible. `status`
tells, per store and app, whether it is configured, its cursors and the gap report; it exits 0.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TaskID

from subledger.app.cli.common import ConfigOption, DatabaseOption, JsonOption, connection, fail, out, parse_when
from subledger.app.cli.common import err as err_console
from subledger.app.progress import counting
from subledger.app.reconcile import Summary
from subledger.app.reconcile_schedule import RECONCILERS, Api, Reconciler, configured_apps, pages_read, run, status
from subledger.app.settings import Settings
from subledger.app.sources import Sources, build_sources
from subledger.app.wording import plural
from subledger.core.errors import ConfigError, PayloadRejected, StoreError, Transient
from subledger.core.events import format_time
from subledger.outbox.ingest import wake_relay
from subledger.store.reconciliation import GAP_WINDOW

reconcile_app = typer.Typer(help="Recover facts a store's webhooks never delivered, from the store's API.",
                            no_args_is_help=True)

AppOption = Annotated[str | None, typer.Option("--app", help="Only this app (default: every app whose API "
                                                             "credentials for this store are configured).")]
SinceOption = Annotated[str | None, typer.Option("--since", help="Read from this time (RFC 3339; default: the "
                                                                 "mode's cursor less an overlap, within the "
                                                                 "store's window).")]
AllTypesOption = Annotated[bool, typer.Option(
    "--all", "--all-types", help="Every event the store lists, not only those whose deliveries failed (the daily "
                                 "run; --all as for apple and google).")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="List what would be recovered; write nothing.")]


def _store_command(reconciler: Reconciler) -> Callable[..., None]:
    def command(
        app: AppOption = None,
        since: SinceOption = None,
        all_types: AllTypesOption = False,
        dry_run: DryRunOption = False,
        as_json: JsonOption = False,
        config: ConfigOption = None,
        database_url: DatabaseOption = None,
    ) -> None:
        _reconcile(reconciler, app, since, all_types, dry_run, as_json, config, database_url)

    command.__doc__ = (f"List {reconciler.title}'s {reconciler.listing} (failed deliveries, or --all) "
                       "and ingest those the log lacks.")
    return command


def sources_or_fail(settings: Settings) -> Sources:
    """The store adapters a recovered fact is mapped by, or one error line."""
    try:
        return build_sources(settings)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def chosen_apps(settings: Settings, reconciler: Reconciler, app: str | None) -> list[str]:
    """`--app` when its credentials for this store are configured, else every app that has them; one
    error line naming what to configure when there is none (every `reconcile <store>` command)."""
    if app is not None:
        found = settings.apps.get(app)
        if found is None or not reconciler.configured(found):
            raise fail(f"app {app!r} has no {reconciler.needs} configured (add {reconciler.where(app)})")
        return [app]
    chosen = configured_apps(settings, reconciler)
    if not chosen:
        article = "an" if reconciler.needs[0] in "AEIOU" else "a"
        raise fail(f"no app has {article} {reconciler.needs} configured (add {reconciler.where('<app>')})")
    return chosen


def print_json(summaries: Sequence[Summary]) -> None:
    """`--json`: one summary object for one app, a list for several."""
    print(json.dumps(summaries[0].as_json() if len(summaries) == 1 else [s.as_json() for s in summaries]))


def _reconcile(reconciler: Reconciler, app: str | None, since: str | None, all_types: bool, dry_run: bool,
               as_json: bool, config: Path | None, database_url: str | None) -> None:
    source = reconciler.source
    start = parse_when(since, "--since") if since is not None else None
    with connection(config, database_url) as (services, conn):
        sources = sources_or_fail(services.settings)
        chosen = chosen_apps(services.settings, reconciler, app)
        summaries: list[Summary] = []
        bar = counting(err_console, f"reconciling {source}", "pages") if sys.stderr.isatty() and not as_json \
            else None
        try:
            if bar is not None:
                bar.start()
            for app_id in chosen:
                watch = _PageWatch(bar, bar.add_task(app_id, total=None)) if bar is not None else None
                try:
                    summary = run(services, conn, reconciler, app_id, all_types=all_types, since=start,
                                  dry_run=dry_run, sources=sources, watch=watch.start if watch else None)
                except (Transient, PayloadRejected) as exc:
                    if isinstance(exc, StoreError):
                        raise
                    raise fail(f"reconcile {source} {app_id}: {exc}", 1) from None
                finally:
                    if watch is not None:
                        watch.stop()
                if summary is None:
                    raise fail(f"reconcile {source} {app_id}: another run of this mode for this app is in "
                               "progress (a scheduled job?); try again when it ends", 1)
                summaries.append(summary)
        finally:
            if bar is not None:
                bar.stop()
        if any(s.recovered for s in summaries) and not dry_run:
            wake_relay(conn)
    if as_json:
        print_json(summaries)
        return
    for s in summaries:
        verb = "would recover" if dry_run else "recovered"
        out.print(f"{source} {s.app_id}: {verb} {plural(s.recovered, 'event')}, {s.duplicates} already logged, "
                  f"{s.refused} refused; {plural(s.pages, 'page')}, {plural(s.api_calls, 'API call')}",
                  highlight=False, markup=False)


class _PageWatch:
    """Moves one app's bar as its API client reads pages (the reconciler reports nothing until it is
    done, so the bar polls the client's own page count, ten times a second, from a thread)."""

    def __init__(self, bar: Progress, task: TaskID) -> None:
        self.bar, self.task = bar, task
        self.api: Api | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="subledger-reconcile-progress", daemon=True)

    def start(self, api: Api) -> None:
        self.api = api
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(1)
        if self.api is not None:
            self.bar.update(self.task, completed=pages_read(self.api))

    def _follow(self) -> None:
        while not self.done.wait(0.1):
            assert self.api is not None
            self.bar.update(self.task, completed=pages_read(self.api))


for _reconciler in RECONCILERS.values():
    if _reconciler.generic_command:
        reconcile_app.command(_reconciler.source)(_store_command(_reconciler))


@reconcile_app.command("status")
def status_command(
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Per store and app: configured or not, each cursor, what was recovered (24 h and in all), the gap."""
    with connection(config, database_url) as (services, conn):
        found = status(conn, services.settings, services.clock())
    settings = services.settings.reconciliation
    if as_json:
        print(json.dumps({
            "enabled": settings.enabled, "frequent_minutes": settings.frequent_minutes,
            "daily_hours": settings.daily_hours, "gap_threshold": settings.gap_threshold,
            "gap_window_hours": GAP_WINDOW.total_seconds() / 3600, "stores": [s.as_json() for s in found],
        }))
        return
    schedule = (f"scheduled in serve/relay: failures every {settings.frequent_minutes:g} min, all types every "
                f"{settings.daily_hours:g} h" if settings.enabled else "scheduled runs off ([reconciliation] "
                                                                       "enabled = false)")
    out.print(f"reconciliation {schedule}; a gap is more than {plural(settings.gap_threshold, 'fact')} recovered "
              "in 24 h", highlight=False, markup=False)
    if not found:
        out.print("no store is configured for reconciliation", highlight=False, markup=False)
    for s in found:
        state = ("configured, scheduled" if s.scheduled else "configured, not scheduled") if s.configured \
            else "not configured (no API credentials)"
        gap = f" (a gap: more than {settings.gap_threshold})" if s.gap else ""
        out.print(f"{s.source} {s.app_id}: {state}; recovered {s.recovered_last_24h} in the last 24 h{gap}, "
                  f"{s.recovered_total} in all", highlight=False, markup=False)
        names = {c.name.partition("/")[2]: c for c in s.cursors}
        for mode in sorted(names):
            c = names[mode]
            out.print(f"  {mode}: read until {format_time(c.read_until)} (advanced {format_time(c.updated_at)})",
                      highlight=False, markup=False)
        if s.configured and not s.cursors:
            out.print("  no run has completed yet", highlight=False, markup=False)
