"""`subledger reconcile apple`: the App Store's notification history, or one subscription's refresh.

A command of the `reconcile` group (app/cli/reconcile.py), registered by importing this module
(app/cli/__init__.py). Without `--subscription` it reads the notification history of every app
with an In-App Purchase key (or `--app`): failures only (the frequent run), `--all` every
notification (the daily run). With `--subscription ID` (repeatable) it refreshes those
subscriptions of one app from their statuses and transaction history. One line per run (or
`--json`); exit 1 when Apple could not be read, so a cron job's failure is visible. A progress
bar on a terminal (stderr, transient): pages read, or subscriptions refreshed.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.progress import TaskID

from subledger.app.apple_api import AppleApi, from_settings
from subledger.app.cli.common import ConfigOption, DatabaseOption, JsonOption, connection, err, fail, out, parse_when
from subledger.app.cli.reconcile import chosen_apps, reconcile_app, sources_or_fail
from subledger.app.progress import counting
from subledger.app.reconcile import Summary
from subledger.app.reconcile_apple import refresh_subscription
from subledger.app.reconcile_schedule import RECONCILERS, Api, run
from subledger.app.settings import Settings
from subledger.app.wording import plural
from subledger.core.errors import ConfigError, PayloadRejected, StoreError, Transient
from subledger.outbox.ingest import wake_relay


def _api(settings: Settings, app_id: str) -> AppleApi:
    apple = settings.apps[app_id].apple
    assert apple is not None
    try:
        return from_settings(apple, apple.bundle_id or app_id)
    except ConfigError as exc:
        raise fail(f'apps."{app_id}".{exc.key}: {exc.reason}') from None


@reconcile_app.command("apple")
def apple(
    app: Annotated[str | None, typer.Option("--app", help="Only this app (default: every app whose apple section has "
                                                          "an In-App Purchase key).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Read notifications sent from this time (RFC 3339; "
                                                              "default: the mode's cursor less 72 h; at most "
                                                              "180 days back).")] = None,
    all_types: Annotated[bool, typer.Option("--all", help="Every notification, not only those Apple failed to "
                                                          "deliver (the daily run).")] = False,
    subscription: Annotated[list[str] | None, typer.Option(
        "--subscription", help="Refresh this subscription (its original transaction id, or any of its "
                               "transactions') from its statuses and transaction history; repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be recovered; write nothing.")]
    = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Read the App Store's notification history (failures, or --all) and ingest what the log lacks."""
    start = parse_when(since, "--since") if since is not None else None
    if subscription and (since is not None or all_types):
        raise fail("--subscription refreshes from the subscription's own history: drop --since and --all")
    with connection(config, database_url) as (services, conn):
        settings = services.settings
        sources = sources_or_fail(settings)
        chosen = chosen_apps(settings, RECONCILERS["apple"], app)
        if subscription and len(chosen) > 1:
            raise fail("--subscription needs the app: name it with --app")
        show = sys.stderr.isatty() and not as_json
        results: list[tuple[Summary, str | None]] = []
        bar = counting(err, "reconcile apple", "pages" if not subscription else "subscriptions")
        if show:
            bar.start()
        try:
            for app_id in chosen:
                if subscription:
                    api = _api(settings, app_id)
                    task = bar.add_task(app_id, total=len(subscription))
                    for number, transaction_id in enumerate(subscription, 1):
                        results.append((refresh_subscription(conn, sources, api, app_id, services.policy,
                                                             services.clock(), transaction_id, dry_run=dry_run),
                                        transaction_id))
                        bar.update(task, completed=number)
                    continue
                task = bar.add_task(app_id, total=None)

                def watch(client: Api, t: TaskID = task) -> None:
                    if isinstance(client, AppleApi):
                        client.progress = lambda pages: bar.update(t, completed=pages)

                # the scheduled jobs' own runner: the same lock per mode and app, so a cron run and a
                # scheduled one never read the same window at once
                summary = run(services, conn, RECONCILERS["apple"], app_id, all_types=all_types, since=start,
                              dry_run=dry_run, sources=sources, watch=watch)
                if summary is None:
                    raise fail(f"reconcile apple {app_id}: another run of this mode for this app is in progress "
                               "(a scheduled job?); try again when it ends", 1)
                results.append((summary, None))
        except (Transient, PayloadRejected) as exc:
            if isinstance(exc, StoreError):
                raise
            raise fail(f"reconcile apple {app_id}: {exc}", 1) from None
        except ConfigError as exc:  # the key itself (not a P-256 PEM), found when the client is opened
            raise fail(f'apps."{app_id}".{exc.key}: {exc.reason}') from None
        finally:
            if show:
                bar.stop()
        if any(s.recovered for s, _ in results) and not dry_run:
            wake_relay(conn)
    if as_json:
        bodies = [_json(s, sub) for s, sub in results]
        print(json.dumps(bodies[0] if len(bodies) == 1 else bodies))
        return
    verb = "would recover" if dry_run else "recovered"
    for s, sub in results:
        if sub is None:
            line = (f"apple {s.app_id}: {verb} {plural(s.recovered, 'notification')}, {s.duplicates} already logged, "
                    f"{s.refused} refused; {plural(s.pages, 'page')}, {plural(s.api_calls, 'API call')}")
        else:
            line = (f"apple {s.app_id} subscription {sub}: {verb} {plural(s.recovered, 'fact')}, "
                    f"{s.duplicates} of {plural(s.listed, 'transaction')} already logged, {s.refused} refused; "
                    f"{plural(s.api_calls, 'API call')}")
        out.print(line, highlight=False, markup=False)


def _json(summary: Summary, subscription: str | None) -> dict[str, Any]:
    body = summary.as_json()
    if subscription is not None:
        body["subscription"] = subscription
    return body
