"""Reconciliation's registry and runner: which stores can be reconciled, for which apps, and how a run goes.

One runner serves `subledger reconcile <store>`, the scheduled jobs of `serve`/`relay` and
`subledger reconcile status`, so a run is the same whoever starts it:

- `RECONCILERS` holds one `Reconciler` per store: how to tell that an app's API credentials are
  configured, how to open the store's API client, and the reconcile function (app/reconcile.py's
  `reconcile_stripe` signature, returning a `Summary`). A store plugs in with one entry.
- `run` takes a database session lock per cursor (store and mode) and app first, so two processes
  that both schedule (`serve` and `relay`) never read the same window at once; a run that finds
  it held is skipped (None).
- `scheduled_jobs` gives the scheduler (scheduler/service.py, `PeriodicJob`) two jobs per store and
  app with credentials: the frequent run (failures only) every `frequent_minutes`, and the daily
  run (all types), checked at the same ticks and run when its "<store>/all" cursor is `daily_hours`
  old (so a restart does not repeat it, and a failed daily run is retried at the next tick). No
  credentials, no job. A run the store's API stops (429s past the client's backoff, 5xx, refused credentials) is
  one warning line; it wrote nothing and left its cursor, so the next tick reads the window again.
- `status` is `subledger reconcile status`: configured or not, each cursor, and the gap report
  (recovered in the last 24 h against `gap_threshold`, and in all).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import psycopg

from subledger.app import apple_api
from subledger.app.apple_api import AppleApi
from subledger.app.bootstrap import Services
from subledger.app.google_api import PlayApi
from subledger.app.reconcile import ALL, FAILURES, Summary, cursor_name, reconcile_stripe
from subledger.app.reconcile_apple import reconcile_apple
from subledger.app.reconcile_google import reconcile_google
from subledger.app.settings import AppSettings, ReconciliationSettings, Settings
from subledger.app.sources import Sources, build_sources
from subledger.app.stripe_api import StripeEvents
from subledger.core.errors import SubledgerError
from subledger.core.events import format_time
from subledger.outbox.ingest import IngestPolicy
from subledger.store import reconciliation as rows
from subledger.store.db import connect

if TYPE_CHECKING:
    from subledger.scheduler.service import PeriodicJob

log = logging.getLogger("subledger.reconcile")

Sleep = Callable[[float], None]


class ReconcileFn(Protocol):
    """A store's reconciler (`reconcile_stripe`'s signature): `api` is that store's own client."""

    def __call__(self, conn: psycopg.Connection, sources: Sources, api: Any, app_id: str, policy: IngestPolicy,
                 now: datetime, *, since: datetime | None = None, all_types: bool = False,
                 dry_run: bool = False) -> Summary: ...


class Api(Protocol):
    """What the runner needs of a store's API client: to close it. A client with `calls.pages` (as
    StripeEvents) also gets its pages counted on the CLI's progress bar."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Reconciler:
    """One store's entry in the registry."""

    source: str
    title: str
    listing: str
    """What the store's API lists, for the command's help: "events", "notification history"."""
    needs: str
    """What an app must have configured, for the refusal line: "Stripe API key"."""
    credentials: str
    """Where to configure it, `{app}` for the app: 'api_key to [apps."{app}".stripe]'."""
    configured: Callable[[AppSettings], bool]
    """Whether the app's API credentials are configured (no credentials: no job, no CLI run)."""
    open_api: Callable[[str, AppSettings, Sleep], Api]
    """The store's API client for one app (its id, its settings); `sleep` is how it waits between
    retries (the scheduler's stop event, so a process that stops is not held by a backoff)."""
    reconcile: ReconcileFn
    generic_command: bool = True
    """`subledger reconcile <source>` is made by app/cli/reconcile.py; False: the store's own module
    registers it (Apple's `--subscription`, Google's `--sweep-limit`)."""

    def where(self, app_id: str) -> str:
        return self.credentials.format(app=app_id)


def _stripe_configured(app: AppSettings) -> bool:
    return app.stripe is not None and bool(app.stripe.api_key)


def _stripe_api(_app_id: str, app: AppSettings, sleep: Sleep) -> StripeEvents:
    assert app.stripe is not None and app.stripe.api_key is not None  # _stripe_configured
    return StripeEvents(api_key=app.stripe.api_key, base_url=app.stripe.api_base_url, sleep=sleep)


def _apple_api(_app_id: str, app: AppSettings, sleep: Sleep) -> AppleApi:
    return apple_api.open_api(app, sleep)


def _google_configured(app: AppSettings) -> bool:
    return app.google is not None  # the push path already asks the Play API with these credentials


def _google_api(app_id: str, app: AppSettings, sleep: Sleep) -> PlayApi:
    assert app.google is not None  # _google_configured
    return PlayApi(app_id, app.google, sleep=sleep)


def _reconcile_google(conn: psycopg.Connection, sources: Sources, api: PlayApi, app_id: str, policy: IngestPolicy,
                      now: datetime, *, since: datetime | None = None, all_types: bool = False,
                      dry_run: bool = False) -> Summary:
    """`reconcile_google`, pausing between its resumes (after a 429 / 5xx) the way its client waits
    between retries: in a scheduled run, the scheduler's stop event cuts both short."""
    return reconcile_google(conn, sources, api, app_id, policy, now, since=since, all_types=all_types,
                            dry_run=dry_run, sleep=api.sleep)


RECONCILERS: Final[dict[str, Reconciler]] = {r.source: r for r in (
    Reconciler(
        source="apple", title="Apple", listing="notification history", needs="In-App Purchase key",
        credentials='api_key, key_id and issuer_id to [apps."{app}".apple]', configured=apple_api.configured,
        open_api=_apple_api, reconcile=reconcile_apple, generic_command=False,
    ),
    Reconciler(
        source="google", title="Google Play", listing="voided purchases", needs="Google Play source",
        credentials='[apps."{app}".google]', configured=_google_configured, open_api=_google_api,
        reconcile=_reconcile_google, generic_command=False,
    ),
    Reconciler(
        source="stripe", title="Stripe", listing="events", needs="Stripe API key",
        credentials='api_key to [apps."{app}".stripe]', configured=_stripe_configured, open_api=_stripe_api,
        reconcile=reconcile_stripe,
    ),
)}


def configured_apps(settings: Settings, reconciler: Reconciler) -> list[str]:
    """The apps whose credentials for this store's API are configured, sorted."""
    return sorted(a for a, app in settings.apps.items() if reconciler.configured(app))


def pages_read(api: Api) -> int:
    """Pages a client has read so far (0 when it does not count them)."""
    calls = getattr(api, "calls", None)
    return int(getattr(calls, "pages", 0))


def run(
    services: Services,
    conn: psycopg.Connection,
    reconciler: Reconciler,
    app_id: str,
    *,
    all_types: bool = False,
    since: datetime | None = None,
    dry_run: bool = False,
    sources: Sources | None = None,
    sleep: Sleep = time.sleep,
    watch: Callable[[Api], object] | None = None,
) -> Summary | None:
    """One run for one app under its (cursor, app) lock; None when another session holds the lock.

    Raises what the reconciler raises: `SourceUnavailable` when the API stopped the run (it wrote
    nothing and left the cursor), `CredentialsRefused`, a StoreError. `watch` is handed the API
    client before the run (the CLI's progress bar reads its page count).
    """
    name = cursor_name(reconciler.source, all_types)
    if not rows.try_lock(conn, name, app_id):
        return None
    try:
        api = reconciler.open_api(app_id, services.settings.apps[app_id], sleep)
        try:
            if watch is not None:
                watch(api)
            now = services.clock()
            summary = reconciler.reconcile(conn, sources or build_sources(services.settings), api, app_id,
                                           services.policy, now, since=since, all_types=all_types, dry_run=dry_run)
        finally:
            api.close()
        if all_types and not dry_run:
            # the daily run is due by its "<store>/all" cursor: the reconciler advanced it already unless
            # it keeps cursors of its own making (Google's voided and sweep), so mark the run here
            with conn.transaction():
                rows.advance(conn, name, app_id, now, now)
        return summary
    finally:
        if not conn.closed:  # a lost connection took its lock with it
            conn.rollback()  # whatever a failed run left open (store.db's connection translates its errors)
            rows.unlock(conn, name, app_id)


# -- the scheduled runs ---------------------------------------------------------------------------


def scheduled_jobs(services: Services) -> list[PeriodicJob]:
    """Two jobs per store and app with credentials (none when `[reconciliation] enabled = false`)."""
    from subledger.scheduler.service import PeriodicJob  # deferred: APScheduler loads only in serve/relay

    config = services.settings.reconciliation
    if not config.enabled:
        return []
    chosen = [(r, app_id) for r in RECONCILERS.values() for app_id in configured_apps(services.settings, r)]
    if not chosen:
        return []
    sources = build_sources(services.settings)
    tick = config.frequent_minutes * 60
    log.info("reconciliation scheduled for %s: failures every %g min, all types every %g h",
             ", ".join(f"{r.source} {app_id}" for r, app_id in chosen), config.frequent_minutes, config.daily_hours)
    return [
        PeriodicJob(id=f"reconcile {cursor_name(r.source, all_types)} {app_id}",
                    run=partial(scheduled_run, services, sources, r, app_id, all_types),
                    interval=tick, delay=config.first_run_delay_seconds)
        for r, app_id in chosen for all_types in (False, True)
    ]


def scheduled_run(services: Services, sources: Sources, reconciler: Reconciler, app_id: str, all_types: bool,
                  stop: threading.Event) -> Summary | None:
    """One tick of a scheduled job: the run, or nothing when the daily run is not due or another process
    runs it. A failure is one warning line (the next tick retries); only a bug escapes to the scheduler."""
    name = cursor_name(reconciler.source, all_types)
    config = services.settings.reconciliation
    try:
        with connect(services.database_url, timeout=services.database_timeout) as conn:
            if all_types and not daily_due(conn, name, app_id, services.clock(), config):
                return None
            summary = run(services, conn, reconciler, app_id, all_types=all_types, sources=sources,
                          sleep=partial(_wait, stop))
    except SubledgerError as exc:
        if not stop.is_set():
            log.warning("reconcile %s for app %s failed (%s); the next run retries from the same cursor",
                        name, app_id, exc)
        return None
    if summary is None:
        log.info("reconcile %s for app %s skipped: another process is running it", name, app_id)
    return summary


def _wait(stop: threading.Event, seconds: float) -> None:
    stop.wait(seconds)


def daily_due(conn: psycopg.Connection, name: str, app_id: str, now: datetime,
              config: ReconciliationSettings) -> bool:
    """The daily run is due when its cursor was last advanced `daily_hours` ago (half a tick's slack,
    so a tick a moment early does not put it off a whole tick), or never was."""
    found = rows.cursor_of(conn, name, app_id)
    conn.commit()
    if found is None:
        return True
    slack = timedelta(minutes=config.frequent_minutes / 2)
    return now - found.updated_at >= timedelta(hours=config.daily_hours) - slack


# -- reconcile status -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreStatus:
    """One store and app in `reconcile status`."""

    source: str
    app_id: str
    configured: bool
    scheduled: bool
    cursors: tuple[rows.Cursor, ...]
    recovered_last_24h: int
    recovered_total: int
    gap: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "app_id": self.app_id, "configured": self.configured,
            "scheduled": self.scheduled,
            "cursors": [{"mode": c.name.partition("/")[2] or c.name, "read_until": format_time(c.read_until),
                         "updated_at": format_time(c.updated_at)} for c in self.cursors],
            "recovered_last_24h": self.recovered_last_24h, "recovered_total": self.recovered_total,
            "gap": self.gap,
        }


MODES: Final = (FAILURES, ALL)


def status(conn: psycopg.Connection, settings: Settings, now: datetime) -> list[StoreStatus]:
    """Every store and app that is configured for reconciliation, has a store section, a cursor or
    anything recovered; sorted by store, then app."""
    recent = rows.recovered_since(conn, now - rows.GAP_WINDOW)
    total = rows.recovered_counts(conn)
    cursors = rows.cursors(conn)
    conn.commit()
    config = settings.reconciliation
    keys = {(source, app_id) for app_id, source in (*recent, *total)}
    keys |= {(c.name.partition("/")[0], c.app_id) for c in cursors}
    for app_id, section in settings.apps.items():
        keys |= {(source, app_id) for source in RECONCILERS if getattr(section, source, None) is not None}
    found: list[StoreStatus] = []
    for source, app_id in sorted(keys):
        reconciler, app = RECONCILERS.get(source), settings.apps.get(app_id)
        configured = reconciler is not None and app is not None and reconciler.configured(app)
        mine = tuple(c for c in cursors if c.app_id == app_id and c.name.partition("/")[0] == source)
        last_day = recent.get((app_id, source), 0)
        found.append(StoreStatus(source, app_id, configured, configured and config.enabled, mine, last_day,
                                 total.get((app_id, source), 0), last_day > config.gap_threshold))
    return found


def gaps(conn: psycopg.Connection, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    """/readyz's `reconciliation_gaps`: each app and source whose last 24 h recovered more than the threshold."""
    threshold = settings.reconciliation.gap_threshold
    return [{"app_id": a, "source": s, "recovered_last_24h": n}
            for (a, s), n in sorted(rows.recovered_since(conn, now - rows.GAP_WINDOW).items()) if n > threshold]
