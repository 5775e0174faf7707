"""`subledger reconcile stripe`: recover from a store's API the facts its webhooks never delivered.

One line per app (or `--json`, one summary per app); exit 1 when the API could not be read, so a
cron job's failure is visible. Apple and Google reconcilers are not built yet (README: Reconciliation).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from subledger.app.cli.common import ConfigOption, DatabaseOption, JsonOption, connection, fail, out, parse_when
from subledger.app.reconcile import Summary, reconcile_stripe
from subledger.app.sources import build_sources
from subledger.app.stripe_api import StripeEvents
from subledger.app.wording import plural
from subledger.core.errors import ConfigError, PayloadRejected, StoreError, Transient
from subledger.outbox.ingest import wake_relay

reconcile_app = typer.Typer(help="Recover facts a store's webhooks never delivered, from the store's API.",
                            no_args_is_help=True)


@reconcile_app.command("stripe")
def stripe(
    app: Annotated[str | None, typer.Option("--app", help="Only this app (default: every app with a "
                                                          "Stripe api_key).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Read events created from this time (RFC 3339; "
                                                              "default: the cursor less 3 days, at most 30 days).")]
    = None,
    all_types: Annotated[bool, typer.Option("--all-types", help="Every event, not only those whose webhook "
                                                                "deliveries failed (the daily run).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be recovered; write nothing.")]
    = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """List Stripe's events (delivery_success=false, or --all-types) and ingest those the log lacks."""
    start = parse_when(since, "--since") if since is not None else None
    with connection(config, database_url) as (services, conn):
        settings = services.settings
        try:
            sources = build_sources(settings)
        except ConfigError as exc:
            raise fail(str(exc)) from None
        chosen = sorted(a for a, s in settings.apps.items() if s.stripe is not None and s.stripe.api_key)
        if app is not None:
            found = settings.apps.get(app)
            if found is None or found.stripe is None or not found.stripe.api_key:
                raise fail(f"app {app!r} has no Stripe API key configured (add api_key to [apps.\"{app}\".stripe])")
            chosen = [app]
        if not chosen:
            raise fail("no app has a Stripe API key configured (add api_key to [apps.<app>.stripe])")
        summaries: list[Summary] = []
        for app_id in chosen:
            stripe_settings = settings.apps[app_id].stripe
            assert stripe_settings is not None and stripe_settings.api_key is not None
            api = StripeEvents(api_key=stripe_settings.api_key, base_url=stripe_settings.api_base_url)
            try:
                summaries.append(reconcile_stripe(conn, sources, api, app_id, services.policy, services.clock(),
                                                  since=start, all_types=all_types, dry_run=dry_run))
            except (Transient, PayloadRejected) as exc:
                if isinstance(exc, StoreError):
                    raise
                raise fail(f"reconcile stripe {app_id}: {exc}", 1) from None
            finally:
                api.close()
        if any(s.recovered for s in summaries) and not dry_run:
            wake_relay(conn)
    if as_json:
        print(json.dumps(summaries[0].as_json() if len(summaries) == 1 else [s.as_json() for s in summaries]))
        return
    for s in summaries:
        verb = "would recover" if dry_run else "recovered"
        out.print(f"stripe {s.app_id}: {verb} {plural(s.recovered, 'event')}, {s.duplicates} already logged, "
                  f"{s.refused} refused; {plural(s.pages, 'page')}, {plural(s.api_calls, 'API call')}",
                  highlight=False, markup=False)
